"""SLO-aware placement and admission against least_loaded and round_robin on a conv-trace replay (issue 10).

Lifecycle: start `pdserve serve` (1 prefill + 1 decode by default) with least_loaded;
measure the unloaded latency (sequential requests) and what the cluster holds (a
closed loop's throughput); set the SLOs from the unloaded latency (`--ttft-x`,
`--tpot-x` times its medians); then for each policy, on a fresh server, replay the
conv trace's lengths at `--loads` times that throughput (Poisson arrivals, `--duration`
seconds) with `pdserve bench --slo-send`, and read the gateway's metrics between runs
(rejections, decisions, the predictor's actual/predicted ratios). Ends with a table,
`summary.json` and `pdserve bench compare` charts per load. Needs the engine lock:

    flock /tmp/pdserve-engines.lock timeout 2400 python scripts/bench_slo.py --out /tmp/bench_slo
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
RATIO_EDGES = {"10%": (0.9091, 1.1111), "20%": (0.8333, 1.25), "30%": (0.7692, 1.4286), "50%": (0.6667, 2.0)}


def bench(url: str, out: Path, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", url, "--model", "demo_model",
           "--tokenizer", str(DEMO), "--trace", "conv", "--trace-dir", str(args.trace_dir),
           "--max-input-tokens", str(args.max_input), "--max-output-tokens", str(args.max_output),
           "--temperature", "0", "--no-progress", "--no-charts", "--request-timeout", str(args.request_timeout),
           "--output-dir", str(out), *extra]
    subprocess.run(cmd, check=False, timeout=args.duration + args.request_timeout + 300,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())


def scrape(url: str) -> dict[str, float]:
    """Every pdserve: sample of /metrics, keyed by its full line name with labels."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("pdserve:"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix) and v - before.get(k, 0.0)}


def ratio_error(samples: dict[str, float], name: str) -> dict[str, float]:
    """Share of predictions within 10/20/30/50 % (|predicted/actual - 1|), from the ratio histogram's buckets."""
    buckets = {float(k.split('le="')[1].split('"')[0].replace("+Inf", "inf")): v
               for k, v in samples.items() if k.startswith(f"pdserve:{name}_bucket")}
    total = buckets.get(float("inf"), 0.0)
    if not total:
        return {"count": 0}
    out = {"count": total}
    for label, (low, high) in RATIO_EDGES.items():
        out[f"within_{label}"] = (buckets.get(high, 0.0) - buckets.get(low, 0.0)) / total
    return out


def predictor_error(path: Path, offset: int) -> tuple[dict, int]:
    """p50/p90 of |predicted/actual - 1| for TTFT and TPOT over the placements logged after `offset`."""
    if not path.is_file():
        return {}, offset
    with path.open() as f:
        f.seek(offset)
        rows = [json.loads(line) for line in f if line.strip()]
        offset = f.tell()
    out = {}
    for phase in ("ttft", "tpot"):
        errors = sorted(abs(r[f"predicted_{phase}_s"] / r[f"{phase}_s"] - 1) for r in rows
                        if r.get(f"predicted_{phase}_s") and r.get(f"{phase}_s"))
        if errors:
            out[phase] = {"n": len(errors), "p50": errors[len(errors) // 2],
                          "p90": errors[min(len(errors) - 1, int(0.9 * len(errors)))]}
    return out, offset


def serve(policy: str, args: argparse.Namespace, slo: dict | None) -> ServeProcess:
    config = {"gateway": {"routing_policy": policy}, "engine": {"enable_prefix_caching": args.prefix_caching},
              "slo": {**({"interactive": slo} if slo else {}),
                      "prediction_log": str(args.out / f"predictions_{policy}.jsonl")}}
    path = args.out / f"serve_{policy}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    flags = ["--config", str(path), "--prefill", str(args.prefill), "--decode", str(args.decode),
             "--kv-cache-memory-bytes", str(args.kv_bytes), "--log-level", "warning"]
    server = ServeProcess(flags, args.out / f"serve_{policy}.log")
    server.wait_ready()
    return server


def measure_cluster(server: ServeProcess, args: argparse.Namespace) -> dict:
    unloaded = bench(server.url, args.out / "unloaded", args, "--concurrency", "1", "--num-requests",
                     str(args.probes))
    held = bench(server.url, args.out / "capacity", args, "--concurrency", str(args.capacity_concurrency),
                 "--num-requests", str(args.capacity_requests))
    return {"unloaded_ttft_ms": unloaded["median_ttft_ms"], "unloaded_tpot_ms": unloaded["median_tpot_ms"],
            "capacity_rps": held["request_throughput"]}


def run_policy(policy: str, args: argparse.Namespace, slo: dict, rates: dict[str, float],
               server: ServeProcess | None = None) -> dict:
    server = server or serve(policy, args, slo)
    results = {}
    try:
        # warm-up: a few sequential requests (the latency model calibrates on them)
        bench(server.url, args.out / f"warmup_{policy}", args, "--concurrency", "1", "--num-requests", "4")
        log = args.out / f"predictions_{policy}.jsonl"
        _, offset = predictor_error(log, 0)
        for load, rate in rates.items():
            before = scrape(server.url)
            data = bench(server.url, args.out / f"{policy}_{load}", args, "--rate", str(rate), "--duration",
                         str(args.duration), "--slo-ttft-ms", str(slo["ttft_ms"]), "--slo-tpot-ms",
                         str(slo["tpot_ms"]), "--slo-send", "--label", f"{policy} {load}")
            time.sleep(1.0)
            after = scrape(server.url)
            predictor, offset = predictor_error(log, offset)
            results[load] = {
                "predictor_error": predictor,
                **{k: data.get(k) for k in ("request_goodput", "slo_attainment", "slo_attainment_admitted",
                                            "completed", "failed", "rejected", "median_rejection_ms",
                                            "p99_rejection_ms", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                                            "p99_tpot_ms", "request_throughput", "errors_by_kind", "duration")},
                "rejections": delta(after, before, "pdserve:rejections_total"),
                "decisions": delta(after, before, "pdserve:placement_decisions_total"),
                "ttft_prediction": ratio_error(delta(after, before, "pdserve:ttft_prediction_ratio"),
                                               "ttft_prediction_ratio"),
                "tpot_prediction": ratio_error(delta(after, before, "pdserve:tpot_prediction_ratio"),
                                               "tpot_prediction_ratio"),
            }
            print(policy, load, json.dumps(results[load]), flush=True)
    finally:
        server.terminate()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_slo"))
    parser.add_argument("--policies", nargs="+", default=["least_loaded", "slo_aware", "round_robin"])
    parser.add_argument("--loads", type=float, nargs="+", default=[1.5, 3.0])
    parser.add_argument("--ttft-x", type=float, default=5.0, help="TTFT SLO: this many unloaded median TTFTs")
    parser.add_argument("--tpot-x", type=float, default=3.0, help="TPOT SLO: this many unloaded median TPOTs")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--request-timeout", type=float, default=90.0)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--capacity-concurrency", type=int, default=6)
    parser.add_argument("--capacity-requests", type=int, default=30)
    parser.add_argument("--max-input", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--kv-bytes", type=int, default=512 << 20)
    parser.add_argument("--trace-dir", type=Path, default=REPO.parent / "shared" / "traces")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                        help="Engines' prefix caching (off by default: every run replays the same trace head, so "
                             "cached prompts would make later runs and their TTFT predictions incomparable)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    first = serve(args.policies[0], args, None)
    try:
        cluster = measure_cluster(first, args)
    except BaseException:
        first.terminate()
        raise
    slo = {"ttft_ms": round(args.ttft_x * cluster["unloaded_ttft_ms"], 1),
           "tpot_ms": round(args.tpot_x * cluster["unloaded_tpot_ms"], 2)}
    rates = {f"{x:g}x": round(x * cluster["capacity_rps"], 3) for x in args.loads}
    print("cluster", json.dumps(cluster), "slo", json.dumps(slo), "rates", json.dumps(rates), flush=True)
    results = {"cluster": cluster, "slo": slo, "rates": rates, "policies": {}}
    for i, policy in enumerate(args.policies):
        results["policies"][policy] = run_policy(policy, args, slo, rates, first if i == 0 else None)
        (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    for load in rates:
        dirs = [str(args.out / f"{p}_{load}") for p in args.policies]
        subprocess.run([sys.executable, "-m", "pdserve", "bench", "compare", *dirs, "--labels",
                        ",".join(args.policies), "--output-dir", str(args.out / f"compare_{load}")], check=False)
    print(f"\n{'':<28}" + "".join(f"{p + ' ' + load:>22}" for load in rates for p in args.policies))
    for key in ("request_goodput", "slo_attainment", "slo_attainment_admitted", "completed", "rejected",
                "p99_rejection_ms", "median_ttft_ms", "median_tpot_ms", "ttft_err_p50", "ttft_err_p90",
                "tpot_err_p50", "tpot_err_p90"):
        cells = []
        for load in rates:
            for p in args.policies:
                row = results["policies"][p][load]
                if key.endswith(("_p50", "_p90")):
                    phase, _, q = key.partition("_err_")
                    value = row["predictor_error"].get(phase, {}).get(q)
                else:
                    value = row.get(key)
                cells.append(f"{value:>22.3f}" if isinstance(value, float) else f"{str(value):>22}")
        print(f"{key:<28}" + "".join(cells))


if __name__ == "__main__":
    main()
