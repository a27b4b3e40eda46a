"""Simulated against real: replay a `pdserve bench` run in the simulator and compare latencies.

Reads the run's requests.csv (arrival offsets, prompt and output tokens, and
the measured TTFT and TPOT), simulates the same requests arriving at the same
times on a cluster shaped like the one that served them, with a profile from
`pdserve profile`, and prints measured vs simulated percentiles with their
relative error.

  python -m pdserve.planner.replay RUN_DIR --profile services/planner/profiles/demo_cpu.csv \\
      --model demo_model --hardware cpu --pools mixed=1
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from pdserve.planner.errors import PlannerError, SpecError, TraceError
from pdserve.planner.calibrate import Calibration, cached_tokens
from pdserve.planner.perf_model import DECODE_MODELS, PerfModel, ProfileSet
from pdserve.planner.simulator import InstanceSpec, SimConfig, Simulator
from pdserve.planner.trace import Trace
from pdserve.router.policy import PlacementPolicy
from pdserve.router.registry import make_policy
from pdserve.shared.roles import Role
from pdserve.shared.slo import Priority, RequestSlo

PERCENTILES = (50, 90, 99)


REJECTED = "http_429"  # loadgen's error kind for an admission-control refusal


def read_run(run_dir: Path, rejected: bool = False) -> tuple[Trace, dict[str, np.ndarray]]:
    """The successful requests of a bench run, as a trace plus their measured TTFT and TPOT (s).

    `rejected`: also the requests admission control refused (429), with their max_tokens as
    output (what they asked for); `measured["ok"]` tells them apart, `measured["met_slo"]` is
    bench's per-request verdict.
    """
    path = run_dir / "requests.csv"
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f)
                    if r["success"] == "1" or (rejected and r.get("error_kind") == REJECTED)]
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise TraceError(f"{path}: no successful requests")
    rows.sort(key=lambda r: float(r["start_s"]))
    start = np.array([float(r["start_s"]) for r in rows])
    ok = np.array([r["success"] == "1" for r in rows])
    trace = Trace(run_dir.name, start - start[0], np.array([int(r["prompt_tokens"]) for r in rows]),
                  np.array([max(int(r["output_tokens"] if r["success"] == "1" else r["max_tokens"]), 1)
                            for r in rows]))
    measured = {
        "ttft": np.array([float(r["ttft_ms"]) / 1000 if r["ttft_ms"] else np.nan for r in rows]),
        "tpot": np.array([float(r["tpot_ms"]) / 1000 if r["tpot_ms"] else np.nan for r in rows]),
        "ok": ok, "met_slo": np.array([r.get("met_slo") in ("1", "True", "true") for r in rows]),
        "index": [int(r.get("index") or k) for k, r in enumerate(rows)],
    }
    return trace, measured


def parse_pools(text: str) -> dict[Role, int]:
    pools = {}
    for item in filter(None, text.split(",")):
        role, _, count = item.partition("=")
        try:
            pools[Role(role)] = int(count)
        except ValueError:
            raise SpecError(f"bad pool {item!r}: use mixed=N or prefill=N,decode=N") from None
    return pools


def compare(run_dir: Path, profiles: ProfileSet | PerfModel, model: str, hardware: str, pools: dict[Role, int],
            kv_tokens: int, policy: str | PlacementPolicy, config: SimConfig, slo: RequestSlo | None = None,
            prior_runs: list[Path] | None = None) -> dict:
    """Measured vs simulated percentiles; with `slo` (sent with every request, as `bench --slo-send`)
    the refused requests are replayed too, and goodput (requests within both targets) is compared."""
    trace, measured = read_run(run_dir, rejected=slo is not None)
    perf = profiles if isinstance(profiles, PerfModel) else profiles.get(model, hardware)
    instances = [InstanceSpec(f"{role.value}-{i}", role, hardware, perf, kv_tokens)
                 for role, n in pools.items() for i in range(n)]
    cached = None
    if prior_runs:  # the same server served these first: their prompts are prefixes of this run's (same seed)
        hits = cached_tokens(dict(zip(measured["index"], trace.prompt.tolist())), prior_runs, config.block_size)
        cached = [hits[i] for i in measured["index"]]
    res = Simulator(instances, make_policy(policy) if isinstance(policy, str) else policy, config).run(
        trace, slos=slo, cached=cached)
    simulated = {"ttft": res.ttft, "tpot": res.tpot}
    table = {}
    for metric in ("ttft", "tpot"):
        for p in PERCENTILES:
            m = float(np.nanpercentile(measured[metric], p))
            s = float(np.nanpercentile(simulated[metric], p))
            table[f"{metric}_p{p}"] = {"measured_ms": m * 1000, "simulated_ms": s * 1000,
                                       "error": (s - m) / m if m else None}
    out = {"run": str(run_dir), "requests": len(trace), "rate_rps": trace.rate, "rejected": res.num_rejected,
           "percentiles": table}
    if slo is not None:
        out["goodput"] = goodput_table(run_dir, measured, res, slo)
    return out


def goodput_table(run_dir: Path, measured: dict, res, slo: RequestSlo) -> dict:
    """Requests within both targets, admitted and refused, live vs simulated (goodput over the live run's duration)."""
    with np.errstate(invalid="ignore"):
        sim_good = res.finished & (res.ttft <= slo.ttft_s) & (np.nan_to_num(res.tpot, nan=0.0) <= slo.tpot_s)
        live_good = measured["ok"] & (measured["ttft"] <= slo.ttft_s) & (np.nan_to_num(measured["tpot"], nan=0.0)
                                                                          <= slo.tpot_s)
    try:
        duration = float(json.loads((run_dir / "result.json").read_text())["duration"])
    except (OSError, ValueError, KeyError):
        duration = float(np.nanmax(res.finish)) if res.finished.any() else 1.0
    rows = {"good": (int(live_good.sum()), int(sim_good.sum())),
            "admitted": (int(measured["ok"].sum()), int(res.finished.sum())),
            "rejected": (int((~measured["ok"]).sum()), int(res.num_rejected))}
    out = {k: {"measured": m, "simulated": s, "error": (s - m) / m if m else None} for k, (m, s) in rows.items()}
    out["goodput_rps"] = {"measured": rows["good"][0] / duration, "simulated": rows["good"][1] / duration,
                          "error": out["good"]["error"]}
    out["duration_s"] = duration
    return out


def calibrated_config(cal: Calibration, **changes) -> SimConfig:
    """The live engine's scheduler (vLLM V1: chunked prefill at the calibrated budget) and overheads."""
    return SimConfig(max_prefill_tokens=cal.budget, chunked_prefill=True, kv_bytes_per_token=cal.kv_bytes_per_token,
                     max_batch_size=128, link=cal.link(), overheads=cal.overheads(), **changes)


def default_pools(design: str) -> dict[Role, int]:
    return {Role.PREFILL: 1, Role.DECODE: 1} if design == "disaggregated" else {Role.MIXED: 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--profile", help="Profile CSV (e.g. `pdserve profile`'s); or --calibration.")
    parser.add_argument("--calibration", type=Path,
                        help="`python -m pdserve.planner.calibrate` output: its step lines, serving overheads and "
                             "handoff, vLLM's chunked prefill at its budget, and its design's pools.")
    parser.add_argument("--model", default="demo_model", help="`model` column of the profile.")
    parser.add_argument("--hardware", default="cpu", help="`hardware` column of the profile.")
    parser.add_argument("--pools", help="mixed=N, or prefill=N,decode=N (as served; default mixed=1, or the "
                                        "calibration's design).")
    parser.add_argument("--kv-tokens", type=int, default=1_000_000, help="KV capacity per instance, tokens.")
    parser.add_argument("--policy", default="least_loaded", help="The router policy the server used.")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192, help="vLLM's max_num_batched_tokens.")
    parser.add_argument("--decode-model", default="physical", choices=DECODE_MODELS)
    parser.add_argument("--slo-ttft-ms", type=float, help="With --slo-tpot-ms: the SLO the run sent with every "
                                                           "request (`bench --slo-send`); compares goodput too.")
    parser.add_argument("--slo-tpot-ms", type=float)
    parser.add_argument("--prior", type=Path, nargs="*", default=[],
                        help="Runs the same server served before this one with the same bench seed: their prompts "
                             "are prefixes of this run's and sit in the prefix cache.")
    parser.add_argument("--json", type=Path, help="Also write the comparison here.")
    args = parser.parse_args(argv)
    try:
        if args.calibration:
            cal = Calibration.load(args.calibration)
            cfg = calibrated_config(cal)
            perf: ProfileSet | PerfModel = cal.perf_model()
            pools = parse_pools(args.pools) if args.pools else default_pools(cal.design)
        elif args.profile:
            cfg = SimConfig(max_prefill_tokens=args.max_prefill_tokens)
            perf = ProfileSet.from_csv(args.profile, decode_model=args.decode_model)
            pools = parse_pools(args.pools or "mixed=1")
        else:
            raise SpecError("give --profile or --calibration")
        slo = RequestSlo(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000, Priority.INTERACTIVE) \
            if args.slo_ttft_ms and args.slo_tpot_ms else None
        out = compare(args.run_dir, perf, args.model, args.hardware, pools, args.kv_tokens, args.policy, cfg, slo,
                      args.prior)
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out['requests']} requests at {out['rate_rps']:.2f} req/s")
    print(f"{'metric':<10}{'measured ms':>14}{'simulated ms':>14}{'error':>9}")
    for key, row in out["percentiles"].items():
        err = "" if row["error"] is None else f"{row['error']:+.0%}"
        print(f"{key:<10}{row['measured_ms']:>14.1f}{row['simulated_ms']:>14.1f}{err:>9}")
    if "goodput" in out:
        g = out["goodput"]
        print(f"{'requests':<10}{'measured':>14}{'simulated':>14}{'error':>9}")
        for key in ("good", "admitted", "rejected", "goodput_rps"):
            row = g[key]
            err = "" if row["error"] is None else f"{row['error']:+.0%}"
            print(f"{key:<12}{row['measured']:>12.3g}{row['simulated']:>14.3g}{err:>9}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
