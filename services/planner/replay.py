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
from pdserve.planner.perf_model import DECODE_MODELS, ProfileSet
from pdserve.planner.simulator import InstanceSpec, SimConfig, Simulator
from pdserve.planner.trace import Trace
from pdserve.router.registry import make_policy
from pdserve.shared.roles import Role

PERCENTILES = (50, 90, 99)


def read_run(run_dir: Path) -> tuple[Trace, dict[str, np.ndarray]]:
    """The successful requests of a bench run, as a trace plus their measured TTFT and TPOT (s)."""
    path = run_dir / "requests.csv"
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["success"] == "1"]
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise TraceError(f"{path}: no successful requests")
    rows.sort(key=lambda r: float(r["start_s"]))
    start = np.array([float(r["start_s"]) for r in rows])
    trace = Trace(run_dir.name, start - start[0], np.array([int(r["prompt_tokens"]) for r in rows]),
                  np.array([max(int(r["output_tokens"]), 1) for r in rows]))
    measured = {
        "ttft": np.array([float(r["ttft_ms"]) / 1000 for r in rows]),
        "tpot": np.array([float(r["tpot_ms"]) / 1000 if r["tpot_ms"] else np.nan for r in rows]),
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


def compare(run_dir: Path, profiles: ProfileSet, model: str, hardware: str, pools: dict[Role, int],
            kv_tokens: int, policy: str, config: SimConfig) -> dict:
    trace, measured = read_run(run_dir)
    perf = profiles.get(model, hardware)
    instances = [InstanceSpec(f"{role.value}-{i}", role, hardware, perf, kv_tokens)
                 for role, n in pools.items() for i in range(n)]
    res = Simulator(instances, make_policy(policy), config).run(trace)
    simulated = {"ttft": res.ttft, "tpot": res.tpot}
    table = {}
    for metric in ("ttft", "tpot"):
        for p in PERCENTILES:
            m = float(np.nanpercentile(measured[metric], p))
            s = float(np.nanpercentile(simulated[metric], p))
            table[f"{metric}_p{p}"] = {"measured_ms": m * 1000, "simulated_ms": s * 1000,
                                       "error": (s - m) / m if m else None}
    return {"run": str(run_dir), "requests": len(trace), "rate_rps": trace.rate, "rejected": res.num_rejected,
            "percentiles": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--model", required=True, help="`model` column of the profile.")
    parser.add_argument("--hardware", default="cpu", help="`hardware` column of the profile.")
    parser.add_argument("--pools", default="mixed=1", help="mixed=N, or prefill=N,decode=N (as served).")
    parser.add_argument("--kv-tokens", type=int, default=1_000_000, help="KV capacity per instance, tokens.")
    parser.add_argument("--policy", default="least_loaded", help="The router policy the server used.")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192, help="vLLM's max_num_batched_tokens.")
    parser.add_argument("--decode-model", default="physical", choices=DECODE_MODELS)
    parser.add_argument("--json", type=Path, help="Also write the comparison here.")
    args = parser.parse_args(argv)
    try:
        cfg = SimConfig(max_prefill_tokens=args.max_prefill_tokens)
        out = compare(args.run_dir, ProfileSet.from_csv(args.profile, decode_model=args.decode_model), args.model, args.hardware,
                      parse_pools(args.pools), args.kv_tokens, args.policy, cfg)
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out['requests']} requests at {out['rate_rps']:.2f} req/s")
    print(f"{'metric':<10}{'measured ms':>14}{'simulated ms':>14}{'error':>9}")
    for key, row in out["percentiles"].items():
        err = "" if row["error"] is None else f"{row['error']:+.0%}"
        print(f"{key:<10}{row['measured_ms']:>14.1f}{row['simulated_ms']:>14.1f}{err:>9}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
