"""Arrival processes: when each request of an open loop is sent.

All functions return send times in seconds from the start of the run, sorted,
already cut at the run's limits (a duration and/or a request count). A closed
loop has no schedule: it sends the next request when one finishes (see
`runner`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _cut(times: Sequence[float], duration_s: float | None, num_requests: int | None) -> list[float]:
    out = [float(t) for t in times if duration_s is None or t < duration_s]
    return out[:num_requests] if num_requests is not None else out


def _expected_count(rate: float, duration_s: float | None, num_requests: int | None) -> int:
    if num_requests is not None:
        return num_requests
    assert duration_s is not None, "an open loop needs a duration or a request count"
    # Draw enough gaps that running short of the duration is practically impossible.
    mean = rate * duration_s
    return int(mean + 10 * np.sqrt(mean) + 10)


def gamma(rate: float, burstiness: float, rng: np.random.Generator,
          duration_s: float | None = None, num_requests: int | None = None) -> list[float]:
    """Renewal process with gamma inter-arrival gaps of mean 1/rate.

    The shape is the burstiness: 1 gives a Poisson process, below 1 bursts,
    above 1 smoother traffic (the coefficient of variation is 1/sqrt(shape)),
    the convention of vLLM's benchmark. The first request goes at t = 0.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    n = _expected_count(rate, duration_s, num_requests)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return _cut(times, duration_s, num_requests)


def poisson(rate: float, rng: np.random.Generator,
            duration_s: float | None = None, num_requests: int | None = None) -> list[float]:
    return gamma(rate, 1.0, rng, duration_s, num_requests)


def trace_scale(arrivals_s: Sequence[float], rate: float, duration_s: float | None = None,
                num_requests: int | None = None) -> float:
    """Factor on the trace's gaps that makes the replayed window's mean rate `rate`.

    The window is the part of the trace the run will send: rate x duration
    requests and/or num_requests, at most the whole trace. Scaling by the mean
    of that window (not of the whole trace) matters for short runs, because a
    trace's rate varies over its hour: the conv trace's first minute runs at
    about half its mean rate.
    """
    n = len(arrivals_s)
    if duration_s is not None:
        n = min(n, max(1, round(rate * duration_s)))
    if num_requests is not None:
        n = min(n, num_requests)
    t0 = arrivals_s[0]
    if duration_s is not None and n < len(arrivals_s) and arrivals_s[n] > t0:
        # Row n (the first one left out) lands exactly at the duration: n rows in duration_s.
        return duration_s / (arrivals_s[n] - t0)
    span = arrivals_s[n - 1] - t0 if n > 1 else 0.0
    if span <= 0:
        span = arrivals_s[-1] - t0
        n = len(arrivals_s)
    return (n - 1) / (rate * span) if span > 0 else 1.0


def from_trace(arrivals_s: Sequence[float], rate: float | None = None,
               duration_s: float | None = None, num_requests: int | None = None) -> list[float]:
    """Replay a trace's arrival times, real or time-scaled to a target mean rate.

    Scaling every gap by one factor keeps the trace's burst structure while the
    replayed window's mean rate becomes `rate` (see trace_scale). The first
    replayed arrival is at t = 0.
    """
    if not arrivals_s:
        return []
    if rate is None:
        scale = 1.0
    else:
        scale = trace_scale(arrivals_s, rate, duration_s, num_requests)
        if duration_s is not None:
            # The window holds rate x duration rows; say so exactly rather than trust
            # float rounding at the boundary row.
            window = max(1, round(rate * duration_s))
            num_requests = window if num_requests is None else min(num_requests, window)
    t0 = arrivals_s[0]
    return _cut([(t - t0) * scale for t in arrivals_s], duration_s, num_requests)
