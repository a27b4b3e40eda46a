"""Metric arithmetic over request records. Pure functions, no I/O.

Definitions match vLLM's `vllm bench serve` so that results compare:
- TTFT: send to first token message. E2E latency (e2el): send to last one.
- TPOT of a request: (e2el - ttft) / (output_tokens - 1), only for requests
  with more than one output token; TPOT statistics are over those requests.
- ITL: every gap between consecutive token messages, pooled over requests.
- Throughputs divide by the run's wall-clock duration; failed requests add
  nothing to them.
- Goodput (DistServe): successful requests that meet every given SLO, per
  second. For the TPOT SLO, a request with one output token has TPOT 0.
- Rejections: HTTP 429 answers (admission control); `slo_attainment_admitted`
  is the share of the other requests (admitted ones) that met every SLO, and
  `*_rejection_ms` how fast the refusals came.
- Percentiles are numpy's linear interpolation; an empty sample reports 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
REJECTED = "http_429"  # admission control refused the request


class Timed(Protocol):
    """The fields of a request record that the arithmetic reads."""

    success: bool
    start_s: float
    ttft_s: float
    latency_s: float
    itl_s: list[float]
    output_tokens: int
    prompt_tokens: int
    error_kind: str


@dataclass(frozen=True)
class SloThresholds:
    """Absolute SLOs in seconds; None means the metric is not constrained."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2el_s: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.e2el_s))

    def as_ms(self) -> dict[str, float]:
        out = {"ttft": self.ttft_s, "tpot": self.tpot_s, "e2el": self.e2el_s}
        return {k: v * 1000.0 for k, v in out.items() if v is not None}


def tpot_s(r: Timed) -> float | None:
    """Time per output token after the first; None for one-token outputs."""
    if r.output_tokens > 1:
        return (r.latency_s - r.ttft_s) / (r.output_tokens - 1)
    return None


def meets_slos(r: Timed, slo: SloThresholds) -> bool:
    if not r.success:
        return False
    checks = ((slo.ttft_s, r.ttft_s), (slo.tpot_s, tpot_s(r) or 0.0), (slo.e2el_s, r.latency_s))
    return all(value <= limit for limit, value in checks if limit is not None)


def percentile_key(p: float) -> str:
    """'p99' for 99.0, 'p99.9' for 99.9, as vLLM names its result keys."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def distribution_ms(values_s: Sequence[float], percentiles: Iterable[float], name: str) -> dict[str, float]:
    """mean/median/std/percentiles of a sample in seconds, as '<stat>_<name>_ms' keys."""
    sample = np.asarray(values_s, dtype=float) * 1000.0 if len(values_s) else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(np.mean(sample)),
        f"median_{name}_ms": float(np.median(sample)),
        f"std_{name}_ms": float(np.std(sample)),
    }
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(sample, p))
    return out


def samples(records: Sequence[Timed]) -> dict[str, list[float]]:
    """Per-metric samples in seconds over successful requests (ITL pooled)."""
    ok = [r for r in records if r.success]
    tpots = [t for r in ok if (t := tpot_s(r)) is not None]
    return {
        "ttft": [r.ttft_s for r in ok],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.latency_s for r in ok],
    }


def peak_output_rate(records: Sequence[Timed]) -> tuple[float, int]:
    """Most output tokens in one 1-second bucket, and most requests active in one.

    Buckets start at the earliest successful send; a token's time is its
    request's send time plus TTFT plus the ITLs before it.
    """
    ok = [r for r in records if r.success]
    if not ok:
        return 0.0, 0
    t0 = min(r.start_s for r in ok)
    n_buckets = int(np.ceil(max(r.start_s + r.latency_s for r in ok) - t0)) + 1
    tokens = np.zeros(n_buckets)
    active = np.zeros(n_buckets)
    for r in ok:
        times = r.start_s + r.ttft_s + np.concatenate([[0.0], np.cumsum(r.itl_s)])
        buckets = (times - t0).astype(int)
        np.add.at(tokens, buckets[(buckets >= 0) & (buckets < n_buckets)], 1)
        first, last = int(r.start_s - t0), int(r.start_s + r.latency_s - t0)
        active[first:last + 1] += 1
    return float(tokens.max()), int(active.max())


def summarize(records: Sequence[Timed], duration_s: float, percentiles: Sequence[float],
              slo: SloThresholds | None = None) -> dict[str, object]:
    """The aggregate metrics of a run, keyed as in vLLM's result.json where both have them."""
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(meets_slos(r, slo) for r in ok) if slo is not None and slo.any else None
    peak_tokens, peak_active = peak_output_rate(records)
    out: dict[str, object] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": None if good is None else good / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_active,
        # Share of all sent requests (failed ones included) that met every SLO.
        "slo_attainment": None if good is None else (good / len(records) if records else 0.0),
        "errors_by_kind": dict(Counter(r.error_kind for r in records if not r.success)),
    }
    rejected = [r for r in records if r.error_kind == REJECTED]
    admitted = len(records) - len(rejected)
    out["rejected"] = len(rejected)
    out["slo_attainment_admitted"] = None if good is None else (good / admitted if admitted else 0.0)
    out.update(distribution_ms([r.latency_s for r in rejected], percentiles, "rejection"))
    for name, values in samples(records).items():
        out.update(distribution_ms(values, percentiles, name))
    return out


def unloaded_latency(records: Sequence[Timed]) -> SloThresholds:
    """Median TTFT, TPOT and E2E of probe requests sent one at a time."""
    s = samples(records)
    if not s["ttft"]:
        raise ValueError("no probe request succeeded")
    return SloThresholds(ttft_s=float(np.median(s["ttft"])),
                         tpot_s=float(np.median(s["tpot"])) if s["tpot"] else 0.0,
                         e2el_s=float(np.median(s["e2el"])))


def scaled_slos(ms: SloThresholds, multiples: dict[str, float | None], unloaded: SloThresholds | None) -> SloThresholds:
    """Combine SLOs given in ms with SLOs given as multiples of the unloaded latency."""
    values = {"ttft": ms.ttft_s, "tpot": ms.tpot_s, "e2el": ms.e2el_s}
    for name, factor in multiples.items():
        if factor is not None:
            if unloaded is None:
                raise ValueError(f"the {name} SLO is a multiple but no unloaded latency was measured")
            values[name] = factor * getattr(unloaded, f"{name}_s")
    return SloThresholds(ttft_s=values["ttft"], tpot_s=values["tpot"], e2el_s=values["e2el"])
