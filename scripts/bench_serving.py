"""pdserve against vLLM's own OpenAI server, with vLLM's own benchmark client, in one run (issue 16).

Lifecycle: for each server named in `--servers`, one after another: start it (same
model, same engine arguments), wait for /health, run `vllm bench serve` (module
`vllm.benchmarks.serve`, random dataset, `--ignore-eos`) against it, stop it. Then
print one table (req/s, TTFT, TPOT, ITL) with every figure's ratio to the first
server (`vllm` unless told otherwise), and write `summary.json` beside the logs.

Servers:
  vllm          python -m vllm.entrypoints.openai.api_server (vLLM's server)
  colocated     pdserve serve --mode colocated (one mixed instance)
  disagg        pdserve serve (one prefill + one decode instance)
  colocated2    pdserve serve --mode colocated --mixed 2 (the interference baseline:
                two mixed instances, the router spreading load)

The issue's table (60 requests at 4 req/s, 512 in / 64 out):

    flock /tmp/pdserve-engines.lock timeout 900 .venv/bin/python scripts/bench_serving.py
    ... --num-prompts 30                                    # a short run
Interference (same cores: 1P+1D against two colocated instances, a wide length mix):

    ... --servers colocated2 disagg --input-len 1024 --range-ratio 0.9 --request-rate 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pdserve.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "services" / "demo_model"
NAME = "demo_model"

PDSERVE = {"colocated": ["--mode", "colocated"], "disagg": [], "colocated2": ["--mode", "colocated", "--mixed", "2"]}
COLUMNS = [  # (label, result key, format)
    ("req/s", "request_throughput", "{:.2f}"),
    ("TTFT mean", "mean_ttft_ms", "{:.0f}"), ("TTFT p50", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99", "p99_ttft_ms", "{:.0f}"),
    ("TPOT mean", "mean_tpot_ms", "{:.1f}"), ("TPOT p99", "p99_tpot_ms", "{:.1f}"),
    ("ITL p50", "median_itl_ms", "{:.1f}"), ("ITL p99", "p99_itl_ms", "{:.1f}"),
]


def server_command(kind: str, port: int, args: argparse.Namespace) -> list[str]:
    """The same model and engine arguments, each server in its own spelling."""
    kind = kind.split("#")[0]
    if kind == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(DEMO),
                "--served-model-name", NAME, "--max-model-len", str(args.max_model_len), "--enforce-eager",
                "--gpu-memory-utilization", str(args.memory), "--seed", "0",
                "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    # pdserve: enforce_eager is its default; gpu_memory_utilization is the host memory share on CPU.
    return [sys.executable, "-m", "pdserve", "serve", "--model", str(DEMO), "--served-model-name", NAME,
            "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.memory),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            *PDSERVE[kind], *args.pdserve_arg]


class Server(ServeProcess):
    """One server in its own session (its whole process tree is signalled at the end), log in a file."""

    def __init__(self, kind: str, args: argparse.Namespace, log: Path) -> None:
        extra = dict(item.split("=", 1) for label, item in args.server_env if label == kind)
        super().__init__([], log, extra, command=lambda port: server_command(kind, port, args))

    def stop(self, timeout_s: float = 90) -> None:
        try:
            self.terminate(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        # vLLM's engine core or Ray's daemons can outlive their parent: the session goes whole.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def bench_command(url: str, out: Path, label: str, args: argparse.Namespace) -> list[str]:
    code = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
            "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
            "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    return [sys.executable, "-c", code, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", NAME, "--tokenizer", str(DEMO), "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(args.num_prompts),
            "--request-rate", str(args.request_rate), "--seed", str(args.seed), "--ignore-eos",
            "--num-warmups", str(args.warmups), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result", "--result-dir", str(out),
            "--result-filename", f"{label}.json"]


def _process_label(proc) -> str:
    """A short name for one of the server's processes (Ray titles its actors 'ray::Class.method')."""
    name = proc.name()
    if name.startswith("ray::"):
        return name.split(".")[0]
    if "python" in name:
        cmd = " ".join(proc.cmdline()[1:4])
        return "pdserve serve (gateway)" if "pdserve" in cmd else ("vllm api server" if "vllm" in cmd else cmd)
    return name


def cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of `root` and every descendant, by pid."""
    import psutil

    out = {}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            times = proc.cpu_times()
            out[proc.pid] = (_process_label(proc), times.user + times.system)
        except psutil.Error:
            pass
    return out


def cpu_breakdown(before: dict, after: dict, wall_s: float) -> list[tuple[str, float]]:
    """Cores used per process kind during the benchmark (CPU seconds over wall seconds), largest first."""
    used: dict[str, float] = {}
    for pid, (label, secs) in after.items():
        used[label] = used.get(label, 0.0) + (secs - before.get(pid, (label, 0.0))[1]) / wall_s
    return sorted(used.items(), key=lambda kv: -kv[1])


def _py_spy(server: Server, out: Path, kind: str, seconds: float) -> list[subprocess.Popen]:
    """py-spy on the gateway / API server and every engine actor, `seconds` long, collapsed stacks."""
    import psutil

    spy = Path(sys.executable).with_name("py-spy")
    procs = [psutil.Process(server.proc.pid)]
    procs += [p for p in procs[0].children(recursive=True) if p.name().startswith(("ray::EngineWorker", "VLLM"))]
    running = []
    for proc in procs:
        label = _process_label(proc).replace(" ", "_").replace(":", "").replace("(", "").replace(")", "")
        running.append(subprocess.Popen(
            [str(spy), "record", "--pid", str(proc.pid), "--duration", str(int(seconds)), "--rate", "200",
             "--format", "raw", "--nonblocking", "--output", str(out / f"{kind}.{label}.{proc.pid}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return running


def run_one(kind: str, args: argparse.Namespace, out: Path) -> dict:
    server = Server(kind, args, out / f"{kind}.log")
    try:
        server.wait_ready()
        if args.settle_s:
            time.sleep(args.settle_s)  # start-up leftovers (compiles, Ray's first polls) settle
        spies = _py_spy(server, out, kind, args.profile_s) if args.profile_s else []
        before, started = cpu_seconds(server.proc.pid), time.monotonic()
        with open(out / f"{kind}.bench.log", "w") as log:
            subprocess.run(bench_command(server.url, out, kind, args), check=True, stdout=log,
                           stderr=subprocess.STDOUT, timeout=args.bench_timeout_s)
        cores = cpu_breakdown(before, cpu_seconds(server.proc.pid), time.monotonic() - started)
        for spy in spies:
            spy.wait(timeout=args.profile_s + 60)
        result = json.loads((out / f"{kind}.json").read_text())
        result["cpu_cores_by_process"] = cores
        return result
    finally:
        server.stop()


def table(results: dict[str, dict], base: str) -> str:
    head = "| server | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for kind, res in results.items():
        lines.append(f"| {kind} | " + " | ".join(fmt.format(res.get(key, float("nan"))) for _, key, fmt in COLUMNS)
                     + " |")
    if base in results:
        lines += ["", f"ratios to {base}:", head, "|" + "---|" * (len(COLUMNS) + 1)]
        for kind, res in results.items():
            if kind == base:
                continue
            cells = []
            for _, key, _ in COLUMNS:
                ref = results[base].get(key)
                cells.append(f"{res[key] / ref:.2f}" if ref else "n/a")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["vllm", "colocated", "disagg"],
                        help=f"servers, in order, from {['vllm', *PDSERVE]}; ratios are to the first. "
                             "KIND#LABEL runs KIND under another name (with its own --server-env)")
    parser.add_argument("--server-env", nargs=2, action="append", default=[], metavar=("SERVER", "VAR=VALUE"),
                        help="an environment variable for one server (repeat), e.g. colocated#old PYTHONPATH=...")
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--request-rate", type=float, default=4.0)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random lengths within [len*(1-r), len*(1+r)] (vLLM's --random-range-ratio)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--memory", type=float, default=0.15, help="gpu_memory_utilization (host memory on CPU)")
    parser.add_argument("--pdserve-arg", action="append", default=[],
                        help="one more argument for pdserve serve (repeat), e.g. --pdserve-arg=--policy=round_robin")
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--bench-timeout-s", type=float, default=600)
    parser.add_argument("--profile-s", type=float, default=0,
                        help="py-spy (collapsed stacks) on the server's Python processes for this many seconds")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_serving"))
    args = parser.parse_args()
    for kind in args.servers:
        if kind.split("#")[0] not in ("vllm", *PDSERVE):
            parser.error(f"unknown server {kind!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.servers:
        started = time.monotonic()
        results[kind] = run_one(kind, args, args.out)
        print(f"{kind}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    (args.out / "summary.json").write_text(json.dumps(
        {k: {key: v.get(key) for _, key, _ in COLUMNS} for k, v in results.items()}, indent=1))
    print(f"\n{args.num_prompts} requests at {args.request_rate:g} req/s, {args.input_len} in "
          f"(range ratio {args.range_ratio:g}) / {args.output_len} out, --ignore-eos; ms\n")
    print(table(results, args.servers[0]))
    print("\ncores used during the benchmark, by process (CPU seconds / wall seconds; the client not counted):")
    for kind, res in results.items():
        print(f"  {kind}: " + ", ".join(f"{label} {used:.2f}" for label, used in res["cpu_cores_by_process"]
                                        if used >= 0.005))


if __name__ == "__main__":
    main()
