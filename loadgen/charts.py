"""PNG charts: latency CDFs of one or more runs, and sweep curves against request rate.

matplotlib runs on the Agg backend so that charts render on machines with no
display (CI, servers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_METRIC_TITLES = {"ttft": "Time to first token (TTFT)", "tpot": "Time per output token (TPOT)",
                  "itl": "Inter-token latency (ITL)", "e2el": "End-to-end latency (E2E)"}
_Y_LABELS = {"itl": "fraction of token gaps ≤ x", "ttft": "fraction of requests ≤ x",
             "tpot": "fraction of requests ≤ x", "e2el": "fraction of requests ≤ x"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_scale_helps(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > 100


def latency_cdfs(series: Sequence[tuple[str, dict[str, list[float]]]], slo_ms: dict[str, float] | None,
                 path: Path) -> Path:
    """2x2 empirical CDFs of TTFT, TPOT, ITL and E2E (ms), one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, name in zip(axes.flat, _METRIC_TITLES):
        pooled: list[float] = []
        for label, samples in series:
            values = np.sort(np.asarray(samples.get(name, []), dtype=float))
            pooled += values.tolist()
            if len(values) == 0:
                continue
            frac = np.arange(1, len(values) + 1) / len(values)
            ax.step(values, frac, where="post", label=f"{label} (n={len(values)})")
        if slo_ms and name in slo_ms:
            ax.axvline(slo_ms[name], color="red", linestyle="--", linewidth=1,
                       label=f"SLO {slo_ms[name]:.1f} ms")
        if _log_scale_helps(pooled):
            ax.set_xscale("log")
        ax.set_title(_METRIC_TITLES[name])
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_ylabel(_Y_LABELS[name])
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        if pooled:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Latency CDFs (successful requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rates(points: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.asarray([float(p["request_rate"]) for p in points])


def sweep_throughput(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: Path) -> Path:
    """Request throughput and goodput (req/s) and output tokens/s against the offered rate."""
    plt = _pyplot()
    fig, (ax_req, ax_tok) = plt.subplots(1, 2, figsize=(12, 4.8))
    top = 0.0
    for label, points in series:
        x = _rates(points)
        top = max(top, float(x.max()))
        line, = ax_req.plot(x, [p["request_throughput"] for p in points], marker="o", label=f"{label} throughput")
        if all(p.get("request_goodput") is not None for p in points):
            ax_req.plot(x, [p["request_goodput"] for p in points], marker="s", linestyle="--",
                        color=line.get_color(), label=f"{label} goodput (all SLOs met)")
        ax_tok.plot(x, [p["output_throughput"] for p in points], marker="o", label=label)
    ax_req.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="served = offered")
    ax_req.set_xlabel("offered request rate (req/s)")
    ax_req.set_ylabel("requests per second")
    ax_req.set_title("Request throughput and goodput")
    ax_tok.set_xlabel("offered request rate (req/s)")
    ax_tok.set_ylabel("output tokens per second")
    ax_tok.set_title("Output token throughput")
    for ax in (ax_req, ax_tok):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_attainment(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: Path) -> Path | None:
    """Share of requests meeting every SLO against the offered rate; None when no run had SLOs."""
    with_slo = [(label, pts) for label, pts in series if all(p.get("slo_attainment") is not None for p in pts)]
    if not with_slo:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for label, points in with_slo:
        ax.plot(_rates(points), [100.0 * p["slo_attainment"] for p in points], marker="o", label=label)
    ax.axhline(90, color="grey", linestyle=":", linewidth=1, label="90 % attainment")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("requests meeting all SLOs (%)")
    ax.set_title("SLO attainment")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
