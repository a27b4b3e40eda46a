"""A simulated run as a `pdserve bench` run: its records, result.json, requests.csv, and the spread of repeats.

The files are written by loadgen's own writers (`loadgen.report.write_run`)
from loadgen `RequestRecord`s, so `pdserve bench compare` reads a simulated
run like a live one. What the simulator does not know is said, not invented:

- a simulated decode run is a series of equal steps between batch changes,
  so the simulator keeps no per-token gaps; `itl_ms` in requests.csv is
  empty, and the ITL statistics in result.json are each request's TPOT
  weighted by its output tokens (`itl_source` says so);
- the peak output rate spreads each request's tokens evenly between its
  first token and its finish.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pdserve.loadgen import metrics, report
from pdserve.loadgen.client import RequestRecord
from pdserve.loadgen.config import BenchConfig
from pdserve.loadgen.runner import RunResult
from pdserve.planner.simulator import SimResult

SPREAD_KEYS = ("request_throughput", "request_goodput", "slo_attainment", "output_throughput",
               "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
               "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms", "simulation_wall_s")


def records(res: SimResult) -> list[RequestRecord]:
    out = []
    for i in range(len(res.arrival)):
        t = float(res.arrival[i])
        r = RequestRecord(index=i, prompt_tokens=int(res.prompt[i]), max_tokens=int(res.output[i]), scheduled_s=t,
                          prefix_group=None, start_s=t, output_tokens=int(res.output[i]), usage_reported=True)
        if res.reject_reason[i] is None and not np.isnan(res.finish[i]):
            r.success, r.finish_reason = True, "length"
            r.ttft_s, r.latency_s = float(res.ttft[i]), float(res.e2e[i])
        else:
            r.fail("rejected", res.reject_reason[i] or "not finished")
        out.append(r)
    return out


def _token_weighted_itl(res: SimResult, percentiles: list[float]) -> dict[str, float]:
    ok = res.finished & (res.output > 1)
    tpot, weight = res.tpot[ok] * 1000.0, (res.output[ok] - 1).astype(float)
    if not len(tpot):
        return metrics.distribution_ms([], percentiles, "itl")
    order = np.argsort(tpot)
    tpot, weight = tpot[order], weight[order]
    cdf = np.cumsum(weight) / weight.sum()
    mean = float(np.average(tpot, weights=weight))
    out = {"mean_itl_ms": mean, "median_itl_ms": float(tpot[np.searchsorted(cdf, 0.5)]),
           "std_itl_ms": float(np.sqrt(np.average((tpot - mean) ** 2, weights=weight)))}
    for p in percentiles:
        out[f"{metrics.percentile_key(p)}_itl_ms"] = float(tpot[min(np.searchsorted(cdf, p / 100), len(tpot) - 1)])
    return out


def _peak_output_rate(res: SimResult) -> float:
    ok = res.finished
    if not ok.any():
        return 0.0
    first, last, n = res.first_token[ok], res.finish[ok], res.output[ok].astype(float)
    buckets = int(np.ceil(last.max())) + 2
    density = np.zeros(buckets + 1)  # tokens/s, piecewise constant per request, added as differences
    span = np.maximum(last - first, 1e-9)
    np.add.at(density, np.floor(first).astype(int), n / span)
    np.add.at(density, np.floor(last).astype(int) + 1, -n / span)
    return float(np.cumsum(density)[:buckets].max())  # per-second buckets, approximated at their starts


def run_result(res: SimResult, config: BenchConfig, slo: metrics.SloThresholds | None,
               unloaded: metrics.SloThresholds | None, extra: dict[str, Any]) -> RunResult:
    recs = records(res)
    finish = res.finish[res.finished]
    duration = float(finish.max()) if len(finish) else max(float(res.arrival.max()), 1e-9)
    summary = metrics.summarize(recs, duration, config.percentiles, slo)
    summary.update(_token_weighted_itl(res, config.percentiles))
    summary["max_output_tokens_per_s"] = _peak_output_rate(res)
    extra = {"itl_source": "simulated: each request's TPOT, weighted by its output tokens", **extra}
    return RunResult(config=config, records=recs, duration_s=duration, summary=summary, slo=slo, unloaded=unloaded,
                     planned=len(recs), extra=extra)


def write(result: RunResult, directory: Path) -> dict[str, Any]:
    """result.json, requests.csv and (unless --no-charts) the latency CDFs, by loadgen's writers."""
    data = report.write_run(result, directory)
    if result.config.charts:
        from pdserve.loadgen import charts

        samples_ms = {k: [v * 1000.0 for v in vs] for k, vs in metrics.samples(result.records).items()}
        charts.latency_cdfs([(result.config.label or "simulated", samples_ms)], data["slo_ms"],
                            directory / "latency_cdf.png")
    return data


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per figure over repeated runs: mean, sample standard deviation, min and max."""
    out = {}
    for key in SPREAD_KEYS:
        values = np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)
        if len(values):
            out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "min": float(values.min()), "max": float(values.max())}
    return out
