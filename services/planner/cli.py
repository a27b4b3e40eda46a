"""Plan a cluster: simulate a trace on candidate designs and report the best ones.

Searches pool sizes and hardware mixes (Splitwise's designs: colocated
baselines, and split prompt/token pools AA, HH, HA, HHcap) with the router's
own placement policy, and reports, per family, the best design for
throughput at a power budget and at a cost budget (from a reference cluster,
by default 40 DGX-H100), and for cost and for power at a target rate.
Writes a terminal table, DIR/plan.json and DIR/*.png.

Examples:
  pdserve plan --trace conv --profile splitwise --model llama2-70b --output-dir out/plan
  pdserve plan --trace my.csv --profile services/planner/profiles/demo_cpu.csv --model demo \\
      --machine cpu:profile_hardware=cpu,tensor_parallel=1,cost_per_hour=1,power_kw=0.2,memory_gb=24 \\
      --families cpu,cpu/cpu --reference cpu:4 --weight-gb 0.02 --kv-bytes-per-token 8192 \\
      --slo ttft_p90=2s --slo tpot_p90=100ms --output-dir out/plan-cpu
"""

from __future__ import annotations

import argparse
import os
import sys

from pdserve.planner.perf_model import DECODE_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--trace", required=True, help="code, conv (the Azure traces) or a CSV with TIMESTAMP,"
                   "ContextTokens,GeneratedTokens.")
    g.add_argument("--rate", type=float, help="Target req/s for the cost and power goals (default: what the "
                   "reference cluster sustains).")
    g.add_argument("--arrivals", default="trace", choices=("trace", "poisson"),
                   help="trace: the trace's own arrival pattern, rescaled to each rate (default); poisson: "
                   "Poisson arrivals at each rate with the trace's request lengths (as Splitwise's simulator).")
    g.add_argument("--seed", type=int, default=0, help="Seed of the Poisson arrivals (default 0).")
    g.add_argument("--window", type=int, default=6000, help="Requests each search simulation replays; 0 for all "
                   "(default 6000). The best design of each family is then re-checked on the whole trace.")
    g.add_argument("--search", default="matched", choices=("matched", "legacy"),
                   help="matched: a contiguous window whose load matches the whole trace's, and the whole-trace "
                   "re-check refines by bisection (default); legacy: every k-th request, growth in 10%% steps.")
    g.add_argument("--no-validate", action="store_true", help="Skip the whole-trace re-check of the best designs.")
    add_slo_arguments(parser)
    add_model_arguments(parser)
    g = parser.add_argument_group("search")
    g.add_argument("--families", default="a100,h100,a100/a100,h100/h100,h100/a100,h100/h100cap",
                   help="Comma list: MACHINE (colocated) or PROMPT/TOKEN (split pools).")
    g.add_argument("--reference", default="h100:40", help="MACHINE:COUNT cluster whose power and cost are the "
                   "budgets (default h100:40, as in Splitwise).")
    g.add_argument("--baseline", default=None, help="Family the ratios are against (default: first family).")
    g.add_argument("--goals", default="iso_power,iso_cost,cost,power", help="Comma list of iso_power, iso_cost, "
                   "cost, power.")
    g.add_argument("--policy", default="splitwise", help="Router placement policy (default splitwise: KV-JSQ "
                   "with the mixed-pool fallback).")
    g.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="Processes for the search.")
    parser.add_argument("--output-dir", required=True, help="Where plan.json and the charts go.")
    parser.add_argument("--no-charts", action="store_true")


def add_slo_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("percentile SLOs")
    g.add_argument("--slo", action="append", default=[], metavar="METRIC_pNN=LIMIT",
                   help="e.g. ttft_p99=6x, tpot_p50=1.25x, e2e_p90=20s (repeat; default: Splitwise's nine SLOs).")
    g.add_argument("--slo-reference", default=None, help="Machine whose solo run defines a 1x slowdown "
                   "(default: the baseline family's machine).")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Profile, model, machines, engine limits and link: shared by `plan` and `simulate`."""
    g = parser.add_argument_group("performance and hardware")
    g.add_argument("--profile", action="append", default=None, metavar="PATH",
                   help="Profile CSV (repeatable); 'splitwise' for Splitwise's (local copy or verified download).")
    g.add_argument("--decode-model", default="physical", choices=DECODE_MODELS,
                   help="physical: weights + KV bytes over memory bandwidth plus per-request compute, fitted to the "
                   "profile and bounded by the machine's peaks (default); batch: piecewise linear in batch size, "
                   "extended linearly; flat: the measured batch curve held flat past the profile, floored at the "
                   "roofline (a lower bound: the fastest step the profile allows); splitwise-sim: as Splitwise's "
                   "simulator (about its batch-1 step at any batch size).")
    g.add_argument("--model", required=True, help="Model name as in the profile's `model` column.")
    g.add_argument("--weight-gb", type=float, help="Model weights, GB per instance (built in for llama2-70b).")
    g.add_argument("--kv-bytes-per-token", type=int, help="KV bytes per token (built in for llama2-70b).")
    g.add_argument("--machine", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="Add or override a machine type (defaults: a100, h100, h100cap from Splitwise's Table I).")
    g = parser.add_argument_group("engine and link")
    g.add_argument("--max-batch-size", type=int, default=512)
    g.add_argument("--max-prefill-tokens", type=int, default=2048)
    g.add_argument("--link-gbps", type=float, default=200.0, help="KV bandwidth of each machine's link, GB/s.")
    g.add_argument("--link-latency-ms", type=float, default=0.5)
    g.add_argument("--overlap", type=float, default=0.95, help="Share of the handoff hidden by layer-wise sending.")
    g.add_argument("--no-link-sharing", action="store_true", help="Every KV transfer gets the whole bandwidth "
                   "(default: concurrent transfers out of or into one machine share its link).")


def build_planner(args, load_trace: bool = True):
    """Everything a search needs, from the arguments (shared with `simulate`, tests and scripts).

    `load_trace=False`: the caller brings its own requests (`simulate`); the planner gets a placeholder.
    """
    from pdserve.planner.hardware import DEFAULT_MACHINES, decode_limits, parse_machine, resolve_model
    from pdserve.planner.perf_model import ProfileSet, resolve_profile
    from pdserve.planner.search import Family, Planner
    from pdserve.planner.simulator import LinkConfig, SimConfig
    from pdserve.planner.slo import SPLITWISE_SLOS, SloChecker, parse_slo
    from pdserve.planner.trace import Trace
    from pdserve.planner.trace import load_trace as load
    from pdserve.router.registry import make_policy

    import numpy as np

    # cheap checks first: a typo should not wait for a trace to load
    slos = [parse_slo(s) for s in args.slo] or list(SPLITWISE_SLOS)
    trace = load(args.trace) if load_trace else Trace("none", np.zeros(1), np.ones(1, np.int64), np.ones(1, np.int64))
    machines = dict(DEFAULT_MACHINES)
    for spec in args.machine:
        m = parse_machine(spec, machines)
        machines[m.name] = m
    model = resolve_model(args.model, args.weight_gb, args.kv_bytes_per_token)
    profiles = ProfileSet.from_csv(*[resolve_profile(p) for p in (args.profile or [None])],
                                   decode_model=args.decode_model)
    families = [Family.parse(f) for f in args.families.split(",") if f]
    baseline = Family.parse(args.baseline) if args.baseline else families[0]
    ref_machine = machines[args.slo_reference or baseline.prompt]
    checker = SloChecker(slos, profiles.get(model.name, ref_machine.profile_hardware, ref_machine.tensor_parallel,
                                            decode_limits(model, ref_machine)))
    make_policy(args.policy)  # fail now on an unknown name, not in a worker
    cfg = SimConfig(max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
                    kv_bytes_per_token=model.kv_bytes_per_token,
                    link=LinkConfig(bandwidth_gbps=args.link_gbps, latency_s=args.link_latency_ms / 1000,
                                    overlap=args.overlap, shared=not args.no_link_sharing))
    planner = Planner(trace, profiles, model, machines, checker, _PolicyFactory(args.policy), cfg,
                      window=args.window or None, arrivals=args.arrivals, seed=args.seed, search=args.search)
    return planner, families, baseline


class _PolicyFactory:
    """A picklable zero-argument factory (worker processes build their own policy objects)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self):
        from pdserve.router.registry import make_policy

        return make_policy(self.name)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.planner.errors import PlannerError
    from pdserve.planner.plan import full_trace_speed, make_plan
    from pdserve.planner.report import format_table, write_charts, write_json
    from pdserve.planner.search import Design

    try:
        planner, families, baseline = build_planner(args)
        name, _, count = args.reference.partition(":")
        reference = Design(type(baseline).parse(name), int(count or 1))
        planner.machine(name)
        goals = [g for g in args.goals.split(",") if g]
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        speed = full_trace_speed(planner, reference)
        print(f"simulator: {speed['requests']} requests ({speed['trace_s']:.0f} s of trace) on {speed['design']} "
              f"in {speed['wall_s']:.2f} s wall = {speed['simulated_requests_per_s']:.0f} simulated requests/s")
        plan = make_plan(planner, families, reference, baseline, goals, args.rate, args.jobs,
                         validate=not args.no_validate)
    except (PlannerError, ValueError) as exc:
        print(f"pdserve plan: error: {exc}", file=sys.stderr)
        return 2
    plan["inputs"] = {
        "trace": args.trace, "requests_in_trace": len(planner.trace), "window": args.window, "model": args.model,
        "policy": args.policy, "arrivals": args.arrivals, "seed": args.seed, "search": args.search, "decode_model": args.decode_model, "slos": [str(s) for s in planner.checker.slos], "families": args.families,
        "machines": {k: m.model_dump() for k, m in planner.machines.items()},
        "sim_config": planner.cfg.model_dump(),
    }
    plan["full_trace_speed"] = speed
    for goal, result in plan["goals"].items():
        print()
        print(format_table(goal, result["best"], result.get("infeasible_families", [])))
    s = plan["search"]
    print(f"\n{s['simulations']} simulations, {s['simulated_requests']} simulated requests in "
          f"{s['simulation_wall_s']:.0f} s of simulation ({s['simulated_requests_per_s']:.0f} req/s per process); "
          f"search took {s['elapsed_s']:.0f} s on {s['jobs']} process(es)")
    write_json(out / "plan.json", plan)
    if not args.no_charts:
        write_charts(out, plan)
    print(f"wrote {out / 'plan.json'}")
    return 0
