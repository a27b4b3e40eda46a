"""A planning run: the goals, their searches (in parallel), and the plan they add up to.

Phase 1 finds, per family, the best design at the power budget and at the
cost budget (both taken from a reference cluster, by default 40 DGX-H100 as
in Splitwise). Phase 2 finds, per family, the cheapest and the least
power-hungry design that sustains the target rate (by default what the
reference cluster sustains, so "the same throughput for less").
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass

from pdserve.planner.report import evaluation_row
from pdserve.planner.search import Design, Family, Planner, best_at_budget, cheapest_at_rate
from pdserve.planner.simulator import Simulator

_PLANNER: Planner | None = None  # set in each worker process by _init


def _init(planner: Planner) -> None:
    global _PLANNER
    _PLANNER = planner


@dataclass(frozen=True)
class Task:
    goal: str
    family: Family
    budget: float = 0.0
    rate: float = 0.0
    upper: int = 0
    validate: bool = True


def _run_task(task: Task):
    """Returns (task, {goal: best evaluation or None}, sweep, simulation stats)."""
    pl = _PLANNER
    before = (pl.simulations, pl.simulated_requests, pl.sim_wall_s)
    if task.goal in ("iso_power", "iso_cost"):
        per = (lambda m: m.power_kw) if task.goal == "iso_power" else (lambda m: m.cost_per_hour)
        best, sweep = best_at_budget(task.family, pl, task.budget, per)
        bests = {task.goal: best}
    else:  # "at_rate": the cost and the power goals share one frontier
        bests, sweep = cheapest_at_rate(task.family, pl, task.rate, task.upper, {"cost": pl.cost, "power": pl.power})
    if task.validate:
        for e in {id(e): e for e in bests.values() if e is not None}.values():
            pl.validate(e, at_rate=task.goal == "at_rate")
    stats = (pl.simulations - before[0], pl.simulated_requests - before[1], pl.sim_wall_s - before[2])
    return task, bests, sweep, stats


def _map(planner: Planner, tasks: list[Task], jobs: int) -> list:
    if jobs <= 1 or len(tasks) <= 1:
        _init(planner)
        return [_run_task(t) for t in tasks]
    # fork: workers inherit the loaded trace and profiles instead of re-reading them
    with multiprocessing.get_context("fork").Pool(jobs, initializer=_init, initargs=(planner,)) as pool:
        return pool.map(_run_task, tasks, chunksize=1)


def _collect(results: list, baseline: Family) -> dict:
    goals: dict = {}
    for task, bests, sweep, _ in results:
        for goal, best in bests.items():
            g = goals.setdefault(goal, {"best": [], "sweeps": {}, "_evals": {}, "_missing": []})
            if best is None:
                g["_missing"].append(task.family.name)
            else:
                g["_evals"][task.family] = best
            g["sweeps"][task.family.name] = [evaluation_row(e) for e in sweep]
    for g in goals.values():
        base = g["_evals"].get(baseline)
        g["best"] = [evaluation_row(e, base) for e in g.pop("_evals").values()]
        g["infeasible_families"] = g.pop("_missing")
    return goals


def make_plan(planner: Planner, families: list[Family], reference: Design, baseline: Family,
              goals: list[str], rate: float | None, jobs: int, validate: bool = True, log=print) -> dict:
    t0 = time.perf_counter()
    budgets = {"iso_power": planner.power(reference), "iso_cost": planner.cost(reference)}
    results: list = []
    phase1 = [Task(g, f, budget=budgets[g], validate=validate) for g in ("iso_power", "iso_cost") if g in goals for f in families]
    need_ref_rate = rate is None and any(g in goals for g in ("cost", "power"))
    ref_eval = None
    if need_ref_rate:
        ref_eval = planner.max_rate(reference, planner.rate_guess(reference))
        planner.validate(ref_eval, at_rate=False)  # the target is what it sustains on the whole trace
        rate = ref_eval.full_trace_rate if ref_eval.full_trace_rate is not None else ref_eval.rate
        log(f"target rate: {reference.label()} sustains {rate:.1f} req/s under the SLOs")
    base = (planner.simulations, planner.simulated_requests, planner.sim_wall_s)  # tasks report their own
    if phase1:
        log(f"searching {len(phase1)} family x budget combinations on {jobs} process(es)...")
        results += _map(planner, phase1, jobs)
    upper = max(2 * (reference.prompt_count + reference.token_count), 8)
    phase2 = ([Task("at_rate", f, rate=rate, upper=upper, validate=validate) for f in families]
              if any(g in goals for g in ("cost", "power")) else [])
    if phase2 and rate and rate > 0:
        log(f"searching {len(phase2)} families for cost and power at {rate:.1f} req/s...")
        results += _map(planner, phase2, jobs)
    goal_results = _collect(results, baseline)
    sims = sum(r[3][0] for r in results) + base[0]
    reqs = sum(r[3][1] for r in results) + base[1]
    sim_wall = sum(r[3][2] for r in results) + base[2]
    return {
        "budgets": {"reference_cluster": reference.label(), "power_kw": budgets["iso_power"],
                    "cost_per_hour": budgets["iso_cost"]},
        "target_rate_rps": rate,
        "reference_rate_rps": rate if ref_eval else None,
        "baseline_family": baseline.name,
        "goals": {g: goal_results[g] for g in goals if g in goal_results},
        "search": {"simulations": sims, "simulated_requests": reqs, "simulation_wall_s": round(sim_wall, 2),
                   "simulated_requests_per_s": round(reqs / sim_wall, 1) if sim_wall else None,
                   "elapsed_s": round(time.perf_counter() - t0, 2), "jobs": jobs},
    }


def full_trace_speed(planner: Planner, design: Design) -> dict:
    """The whole trace at its own rate on `design`: how fast the simulator is, in requests per wall second."""
    res = Simulator(planner.instances(design), planner.policy_factory(), planner.cfg).run(planner.trace)
    return {"design": design.label(), "requests": len(res.arrival), "trace_s": round(planner.trace.duration, 1),
            "wall_s": round(res.wall_s, 3), "events": res.events,
            "simulated_requests_per_s": round(res.requests_per_wall_s, 1), "rejected": res.num_rejected}
