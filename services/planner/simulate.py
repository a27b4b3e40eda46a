"""Simulate one cluster design on one workload, and report it as `pdserve bench` reports a live run.

The design is `--pools h100:40` (40 colocated machines), `--pools
h100/a100:25+15` (25 prompt machines, 15 token machines), or a pdserve YAML
config (`--config`, its pools and routing policy, on `--hardware`). The
workload is a trace (`conv`, `code`, a CSV) or synthetic lengths, with trace,
Poisson or gamma arrivals at `--rate` for `--duration` (see `workload.py`
for how lengths are resampled past the trace's end). Placement is the live
router's policy of that name.

Writes DIR/result.json and DIR/requests.csv with `pdserve bench`'s keys and
columns (so `pdserve bench compare DIR LIVE_DIR` works), plus the planner's
percentile-SLO check and the simulator's wall time. `--repeats K` runs seeds
SEED..SEED+K-1 into DIR/repeat_<k>/ and reports each figure's spread in
DIR/repeats.json.

Examples:
  pdserve simulate --pools h100/h100:25+15 --trace conv --arrival poisson --rate 180 --duration 600 \\
      --profile splitwise --model llama2-70b --output-dir out/sim-hh
  pdserve simulate --config pdserve.yaml --hardware cpu --machine cpu:... --trace my.csv ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdserve.planner.cli import add_model_arguments, add_slo_arguments

    g = parser.add_argument_group("design")
    g.add_argument("--pools", help="MACHINE:N (colocated) or PROMPT/TOKEN:NP+NT (split pools), e.g. h100/a100:25+15.")
    g.add_argument("--config", type=Path, help="A pdserve YAML config: its pools and gateway.routing_policy.")
    g.add_argument("--hardware", default="h100", help="With --config: MACHINE, or PROMPT/TOKEN machines (default h100).")
    g.add_argument("--policy", help="Router placement policy (default: the config's, else splitwise).")
    g = parser.add_argument_group("workload")
    g.add_argument("--trace", help="code, conv or a CSV; none: synthetic lengths (--input-len, --output-len).")
    g.add_argument("--arrival", choices=("trace", "poisson", "gamma"), help="default: trace with --trace, else poisson.")
    g.add_argument("--rate", type=float, help="Requests/s (trace arrivals: the trace's gaps rescaled to it).")
    g.add_argument("--duration", type=float, metavar="S", help="No arrival after S seconds.")
    g.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape (1: Poisson).")
    g.add_argument("--input-len", type=int, default=1024)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--length-dist", default="fixed", choices=("fixed", "uniform", "exponential", "lognormal"))
    g.add_argument("--length-spread", type=float, default=0.5)
    g.add_argument("--seed", type=int, default=0, help="Seed of arrivals and resampled lengths (default 0).")
    g.add_argument("--turns", type=int, default=1,
                   help="Group the requests into conversations of this many turns, each resending its history "
                        "(every instance then models a prefix cache; see --policy prefix_aware). Default 1.")
    g.add_argument("--repeats", type=int, default=1, help="Runs with seeds SEED..SEED+K-1; reports the spread.")
    g = parser.add_argument_group("per-request SLOs (goodput, as pdserve bench; default: TTFT 3x, TPOT 1.5x of "
                                  "the unloaded median request)")
    for name in ("ttft", "tpot", "e2el"):
        g.add_argument(f"--slo-{name}-ms", type=float, metavar="MS")
        g.add_argument(f"--slo-{name}-x", type=float, metavar="X")
    g.add_argument("--slo-send", action="store_true", help="Every request carries its TTFT/TPOT targets, as "
                                                           "`pdserve bench --slo-send` (read by --policy slo_aware).")
    add_slo_arguments(parser)
    add_model_arguments(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, required=True)
    g.add_argument("--label")
    g.add_argument("--percentiles", type=lambda s: [float(x) for x in s.split(",")], default=[50.0, 90.0, 99.0])
    g.add_argument("--no-charts", action="store_true")


def parse_design(text: str):
    """`h100:40` or `h100/a100:25+15` -> Design."""
    from pdserve.planner.errors import SpecError
    from pdserve.planner.search import Design, Family

    machines, _, counts = text.partition(":")
    family = Family.parse(machines)
    try:
        numbers = [int(c) for c in counts.split("+")]
    except ValueError:
        raise SpecError(f"bad --pools {text!r}: use MACHINE:N or PROMPT/TOKEN:NP+NT") from None
    if len(numbers) != (2 if family.split else 1) or min(numbers) < 1:
        raise SpecError(f"bad --pools {text!r}: use MACHINE:N or PROMPT/TOKEN:NP+NT, counts >= 1")
    return Design(family, *numbers)


def design_from_config(path: Path, hardware: str):
    """A pdserve YAML config's pools as a design on `hardware`, and its routing policy."""
    from pdserve.planner.errors import SpecError
    from pdserve.planner.search import Design, Family
    from pdserve.shared.config import ServeConfig
    from pdserve.shared.errors import ConfigError

    try:
        cfg = ServeConfig.load(path)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    machines = Family.parse(hardware)
    mixed, prefill, decode = cfg.pools.mixed.instances, cfg.pools.prefill.instances, cfg.pools.decode.instances
    if mixed and (prefill or decode):
        raise SpecError(f"{path}: mixed and prefill/decode pools together are not one planner design")
    if mixed:
        return Design(Family(machines.prompt), mixed), cfg.gateway.routing_policy
    return Design(Family(machines.prompt, machines.token or machines.prompt), prefill,
                  decode), cfg.gateway.routing_policy


def _workload_spec(args):
    from pdserve.planner.workload import WorkloadSpec

    arrival = args.arrival or ("trace" if args.trace else ("gamma" if args.burstiness != 1.0 else "poisson"))
    return WorkloadSpec(trace=args.trace, arrival=arrival, rate=args.rate, duration_s=args.duration,
                        burstiness=args.burstiness, seed=args.seed, input_len=args.input_len,
                        output_len=args.output_len, length_dist=args.length_dist, length_spread=args.length_spread)


def _slo_config(args):
    from pdserve.loadgen.config import SloConfig

    given = {f"{n}_{u}": getattr(args, f"slo_{n}_{u}") for n in ("ttft", "tpot", "e2el") for u in ("ms", "x")}
    if all(v is None for v in given.values()):
        given.update(ttft_x=3.0, tpot_x=1.5)  # Splitwise's P90 slowdowns, per request
    return SloConfig(**given)


def _planner(args, design, policy: str):
    from pdserve.planner.cli import build_planner

    # `plan`'s builder with this design as the only family; its trace is unused (the workload is built here)
    family = design.family.prompt + (f"/{design.family.token}" if design.family.split else "")
    ns = argparse.Namespace(**{**vars(args), "policy": policy}, families=family, baseline=None, window=0,
                            arrivals="trace", search="matched")
    return build_planner(ns, load_trace=False)[0]


def _unloaded(planner, design, trace):
    """Median-length request alone on the design: the simulator's analogue of bench's unloaded probes."""
    import numpy as np

    from pdserve.loadgen.metrics import SloThresholds
    from pdserve.planner.simulator import Simulator
    from pdserve.planner.trace import Trace

    probe = Trace("probe", np.zeros(1), np.array([int(np.median(trace.prompt))]),
                  np.array([max(int(np.median(trace.output)), 2)]))
    res = Simulator(planner.instances(design), planner.policy_factory(), planner.cfg).run(probe)
    return SloThresholds(ttft_s=float(res.ttft[0]), tpot_s=float(res.tpot[0]), e2el_s=float(res.e2e[0]))


def simulate_once(args, planner, design, spec, out_dir: Path, source) -> dict:
    from pdserve.loadgen.runner import resolve_slos
    from pdserve.planner import sim_results
    from pdserve.planner.simulator import Simulator
    from pdserve.planner.workload import bench_config, build

    slo_cfg = _slo_config(args)
    config = bench_config(spec, args.model, out_dir, args.label or design.label(), slo_cfg, args.percentiles,
                          not args.no_charts)
    trace, resampled = build(spec, config, source)
    if not len(trace):
        from pdserve.planner.errors import SpecError

        raise SpecError("the workload holds no request: check --rate and --duration")
    unloaded = _unloaded(planner, design, trace) if slo_cfg.needs_unloaded else None
    sessions = None
    if args.turns > 1:
        from pdserve.planner.prefix_cache import as_conversations

        trace, sessions = as_conversations(trace, args.turns)
    thresholds = resolve_slos(config, unloaded)
    slos = None
    if args.slo_send and thresholds is not None and thresholds.ttft_s and thresholds.tpot_s:
        from pdserve.shared.slo import Priority, RequestSlo

        slos = RequestSlo(thresholds.ttft_s, thresholds.tpot_s, Priority.INTERACTIVE)
    res = Simulator(planner.instances(design), planner.policy_factory(), planner.cfg).run(trace, sessions, slos)
    check = planner.checker.check(res)
    extra = {"simulated": True, "design": design.label(), "policy": args.policy, "decode_model": args.decode_model,
             "lengths_resampled": resampled, "simulation_wall_s": round(res.wall_s, 3), "simulation_events": res.events,
             "percentile_slos_met": check.ok, "percentile_slo_values": check.values, "binding_slo": check.worst,
             "sim_config": planner.cfg.model_dump(), "turns": args.turns,
             "prefill_tokens_computed": int(res.prefill_computed.sum()), "prompt_tokens": int(res.prompt.sum()),
             "kv_sent_tokens": int(res.kv_sent_tokens.sum())}
    result = sim_results.run_result(res, config, thresholds, unloaded, extra)
    return sim_results.write(result, out_dir)


def _print_spread(stats: dict) -> None:
    print(f"{'figure':<22}{'mean':>12}{'std':>10}{'min':>12}{'max':>12}")
    for key, s in stats.items():
        print(f"{key:<22}{s['mean']:>12.3f}{s['std']:>10.3f}{s['min']:>12.3f}{s['max']:>12.3f}")


def run(args: argparse.Namespace) -> int:
    from pdserve.loadgen.errors import LoadgenError
    from pdserve.loadgen.report import print_summary
    from pdserve.planner import sim_results
    from pdserve.planner.errors import PlannerError, SpecError
    from pdserve.planner.trace import load_source

    t0 = time.perf_counter()
    try:
        if bool(args.pools) == bool(args.config):
            raise SpecError("give one design: --pools or --config")
        design, policy = (parse_design(args.pools), None) if args.pools else design_from_config(args.config,
                                                                                                 args.hardware)
        args.policy = args.policy or policy or "splitwise"
        planner = _planner(args, design, args.policy)
        source = load_source(args.trace) if args.trace else None
        runs = []
        for k in range(max(args.repeats, 1)):
            spec = _workload_spec(argparse.Namespace(**{**vars(args), "seed": args.seed + k}))
            out = args.output_dir if args.repeats <= 1 else args.output_dir / f"repeat_{k}"
            runs.append(simulate_once(args, planner, design, spec, out, source))
    except (PlannerError, LoadgenError, ValueError) as exc:
        print(f"pdserve simulate: error: {exc}", file=sys.stderr)
        return 2
    for data in runs[:1] if args.repeats > 1 else runs:
        print_summary(data)
    last = runs[-1]
    print(f"{design.label()}, policy {args.policy}, decode model {args.decode_model}: percentile SLOs "
          f"{'met' if last['percentile_slos_met'] else 'missed'} (binding {last['binding_slo']}); "
          f"simulated {last['num_prompts']} requests in {last['simulation_wall_s']:.2f} s wall")
    if args.repeats > 1:
        stats = sim_results.spread(runs)
        (args.output_dir / "repeats.json").write_text(json.dumps({"seeds": [args.seed + k for k in range(
            args.repeats)], "spread": stats}, indent=2) + "\n")
        _print_spread(stats)
    print(f"wrote {args.output_dir} in {time.perf_counter() - t0:.1f} s")
    return 0
