"""Live runs for the simulator-vs-live check (issue 14): one server per design, probes then trace replays.

Lifecycle, per design (`disagg`: the default 1 prefill + 1 decode; `colocated`: one mixed instance):
start `pdserve serve` -> 4 warm-up requests -> `--probes` sequential requests with the
conv trace's lengths (the live profile the simulator is calibrated on) -> one
`pdserve bench` conv replay per `--rates` for `--duration` s -> /metrics scraped
before and after each replay -> stop. Every run's requests.csv and result.json go
to OUT/<design>/<run>/, the scrapes to OUT/<design>/metrics_<run>.txt. Needs the
engine lock:

    flock /tmp/pdserve-engines.lock timeout 900 nice -n -10 .venv/bin/python scripts/sim_vs_live.py --out OUT

(`nice -n -10`, as root: on a machine other people's jobs keep busy, the engines, gateway and
client get the CPU first; otherwise their step times measure the neighbours.) Design `slo`:
slo_aware on 1 prefill + 1 decode with SLOs of 5x / 3x the unloaded median TTFT / TPOT
(conv lengths clipped to 512 / 64, as scripts/bench_slo.py) and one `--slo-send` replay.

Then, offline: `python -m pdserve.planner.calibrate` on the probes and
`python -m pdserve.planner.replay` on each replay (services/planner/README.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pdserve.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "services" / "demo_model"
DESIGNS = {"disagg": ["--prefill", "1", "--decode", "1"], "colocated": ["--mode", "colocated"]}


def bench(url: str, out: Path, args: argparse.Namespace, *extra: str) -> None:
    cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", url, "--model", "demo_model",
           "--tokenizer", str(DEMO), "--trace", "conv", "--trace-dir", str(args.trace_dir),
           "--temperature", "0", "--no-progress", "--no-charts", "--request-timeout", str(args.request_timeout),
           "--output-dir", str(out), *extra]
    subprocess.run(cmd, check=False, timeout=args.duration + args.request_timeout + 300, stdout=subprocess.DEVNULL)


def scrape(url: str, path: Path) -> None:
    path.write_text(httpx.get(url + "/metrics", timeout=30).text)


def run_design(name: str, args: argparse.Namespace) -> None:
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    flags = [*DESIGNS[name], *args.serve_flags, "--log-level", "info"]
    server = ServeProcess(flags, out / "serve.log")
    try:
        t0 = time.monotonic()
        server.wait_ready()
        print(f"{name}: ready in {time.monotonic() - t0:.0f} s", flush=True)
        bench(server.url, out / "warmup", args, "--concurrency", "1", "--num-requests", "4",
              "--max-output-tokens", "16", "--trace-start", "3000")
        # isolated requests over the trace's own lengths, from another part of the trace than the replays
        bench(server.url, out / "probes", args, "--concurrency", "1", "--num-requests", str(args.probes),
              "--trace-start", "2000", "--max-output-tokens", str(args.probe_output))
        for rate in args.rates:
            run = f"rate{rate:g}"
            scrape(server.url, out / f"metrics_before_{run}.txt")
            bench(server.url, out / run, args, "--rate", str(rate), "--duration", str(args.duration),
                  "--label", f"{name} {rate:g} req/s")
            time.sleep(1.0)
            scrape(server.url, out / f"metrics_after_{run}.txt")
            print(f"{name}: {run} done at {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        server.terminate()


def run_slo(args: argparse.Namespace) -> None:
    """slo_aware on 1 prefill + 1 decode: unloaded probes set the SLOs, then one replay with --slo-send."""
    out = args.out / "slo"
    out.mkdir(parents=True, exist_ok=True)
    config = out / "serve.yaml"
    config.write_text(json.dumps({"gateway": {"routing_policy": "slo_aware"}}))  # JSON is YAML
    clip = ["--max-input-tokens", "512", "--max-output-tokens", "64"]
    server = ServeProcess(["--config", str(config), "--prefill", "1", "--decode", "1", "--kv-cache-memory-bytes",
                           str(512 << 20), "--log-level", "info"], out / "serve.log")
    try:
        server.wait_ready()
        bench(server.url, out / "warmup", args, "--concurrency", "1", "--num-requests", "4", *clip)
        bench(server.url, out / "unloaded", args, "--concurrency", "1", "--num-requests", "8", *clip)
        unloaded = json.loads((out / "unloaded" / "result.json").read_text())
        slo = {"ttft_ms": round(5 * unloaded["median_ttft_ms"], 1), "tpot_ms": round(3 * unloaded["median_tpot_ms"], 2)}
        (out / "slo.json").write_text(json.dumps(slo))
        print(f"slo: {slo}", flush=True)
        scrape(server.url, out / "metrics_before.txt")
        bench(server.url, out / f"rate{args.slo_rate:g}", args, "--rate", str(args.slo_rate), "--duration",
              str(args.duration), "--slo-ttft-ms", str(slo["ttft_ms"]), "--slo-tpot-ms", str(slo["tpot_ms"]),
              "--slo-send", *clip, "--label", f"slo_aware {args.slo_rate:g} req/s")
        time.sleep(1.0)
        scrape(server.url, out / "metrics_after.txt")
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/work/runs/sim"))
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=[*DESIGNS, "slo"])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--slo-rate", type=float, default=3.0, help="design slo: the replay's rate.")
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--probe-output", type=int, default=48)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--serve-flag", dest="serve_flags", action="append", default=[],
                        help="Extra `pdserve serve` flag (repeat), e.g. --serve-flag=--max-num-batched-tokens=512.")
    parser.add_argument("--trace-dir", type=Path, default=REPO.parent / "shared" / "traces")
    args = parser.parse_args()
    for name in args.designs:
        if name == "slo":
            run_slo(args)
        else:
            run_design(name, args)


if __name__ == "__main__":
    main()
