"""Planner output: the terminal table, `plan.json`, and charts (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve.planner.search import Evaluation

GOAL_TITLES = {
    "iso_power": "Throughput at the power budget",
    "iso_cost": "Throughput at the cost budget",
    "cost": "Cost at the target throughput",
    "power": "Power at the target throughput",
}


def evaluation_row(e: Evaluation, baseline: Evaluation | None = None) -> dict:
    d = e.design
    row = {
        "family": d.family.name, "design": d.label(), "prompt_machine": d.family.prompt,
        "token_machine": d.family.token, "prompt_count": d.prompt_count, "token_count": d.token_count,
        "machines": d.prompt_count + d.token_count,
        # the whole-trace result where the search re-checked it, else the search window's
        "rate_rps": round(e.full_trace_rate if e.full_trace_rate is not None else e.rate, 3),
        "search_rate_rps": round(e.rate, 3), "feasible": e.ok, "full_trace_ok": e.full_trace_ok,
        "grown_from": e.grown_from,
        "cost_per_hour": round(e.cost_per_hour, 2), "power_kw": round(e.power_kw, 2),
    }
    if e.report is not None:
        row["slo_values"] = {k: round(v, 4) for k, v in e.report.values.items()}
        row["binding_slo"] = e.report.worst
        row["rejected"] = e.report.rejected
    if baseline is not None and baseline.rate > 0:
        base_rate = baseline.full_trace_rate if baseline.full_trace_rate is not None else baseline.rate
        row["rate_vs_baseline"] = round(row["rate_rps"] / base_rate, 3) if base_rate else None
        row["cost_vs_baseline"] = round(e.cost_per_hour / baseline.cost_per_hour, 3)
        row["power_vs_baseline"] = round(e.power_kw / baseline.power_kw, 3)
    return row


def format_table(goal: str, rows: list[dict], infeasible: list[str] = ()) -> str:
    """Fixed-width text: one line per family's best design."""
    head = f"{'family':<17}{'design':<28}{'req/s':>8}{'$/h':>9}{'kW':>8}{'x rate':>8}{'x cost':>8}{'x power':>8}  binding SLO"
    lines = [f"== {GOAL_TITLES.get(goal, goal)}", head, "-" * len(head)]
    for r in rows:
        if not r.get("feasible", True) and r["rate_rps"] == 0:
            lines.append(f"{r['family']:<17}{'(none sustains the SLOs)':<28}")
            continue
        lines.append(
            f"{r['family']:<17}{r['design']:<28}{r['rate_rps']:>8.1f}{r['cost_per_hour']:>9.0f}{r['power_kw']:>8.0f}"
            f"{_num(r, 'rate_vs_baseline'):>8.2f}{_num(r, 'cost_vs_baseline'):>8.2f}"
            f"{_num(r, 'power_vs_baseline'):>8.2f}  {r.get('binding_slo', '')}"
            + ("  (misses the SLOs on the whole trace)" if r.get("full_trace_ok") is False else "")
            + (f"  (search found {r['grown_from']})" if r.get("grown_from") else ""))
    lines += [f"{name:<17}(no design in the search range meets the SLOs)" for name in infeasible]
    return "\n".join(lines)


def _num(row: dict, key: str) -> float:
    value = row.get(key)
    return float("nan") if value is None else value


def write_json(path: Path, plan: dict) -> None:
    path.write_text(json.dumps(plan, indent=2, default=str) + "\n")


def write_charts(out: Path, plan: dict) -> list[Path]:
    """One bar chart per goal, and throughput-vs-split curves for the budget goals."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    written = []
    for goal, result in plan["goals"].items():
        rows = [r for r in result["best"] if r["rate_rps"] > 0]
        if not rows:
            continue
        key = {"iso_power": "rate_rps", "iso_cost": "rate_rps", "cost": "cost_per_hour", "power": "power_kw"}[goal]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.bar([r["family"] for r in rows], [r[key] for r in rows], color="tab:blue")
        ax.set_ylabel({"rate_rps": "sustained req/s", "cost_per_hour": "cost per hour",
                       "power_kw": "provisioned kW"}[key])
        ax.set_title(GOAL_TITLES[goal])
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        path = out / f"{goal}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if goal in ("iso_power", "iso_cost") and result.get("sweeps"):
            written.append(_sweep_chart(plt, out, goal, result["sweeps"]))
    return written


def _sweep_chart(plt, out: Path, goal: str, sweeps: dict) -> Path:
    """Search-window rates over the pool split; a star where the best split was re-checked on the whole trace."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for family, points in sweeps.items():
        if len(points) <= 1:
            continue
        line, = ax.plot([p["prompt_count"] for p in points], [p["search_rate_rps"] for p in points], marker="o",
                        markersize=3, label=family)
        checked = [p for p in points if p.get("full_trace_ok") is not None or p["rate_rps"] != p["search_rate_rps"]]
        ax.plot([p["prompt_count"] for p in checked], [p["rate_rps"] for p in checked], marker="*", markersize=11,
                linestyle="none", color=line.get_color())
    ax.set_xlabel("prompt machines (the rest of the budget: token machines)")
    ax.set_ylabel("sustained req/s")
    ax.set_title(f"{GOAL_TITLES[goal]}: pool split (star: whole trace)")
    if ax.get_lines():
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{goal}_split.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
