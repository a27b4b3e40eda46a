"""Arrival processes: rates and burstiness, statistically; trace rescaling exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.loadgen import arrivals


def test_poisson_rate_and_exponential_gaps():
    rng = np.random.default_rng(1)
    times = arrivals.poisson(10.0, rng, num_requests=20000)
    gaps = np.diff(times)
    assert len(times) == 20000 and times[0] == 0.0
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.03)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)  # CV of an exponential


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_cv(burstiness):
    rng = np.random.default_rng(2)
    gaps = np.diff(arrivals.gamma(5.0, burstiness, rng, num_requests=20000))
    assert np.mean(gaps) == pytest.approx(0.2, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)


def test_duration_bounds_the_schedule():
    rng = np.random.default_rng(3)
    times = arrivals.poisson(50.0, rng, duration_s=20.0)
    assert max(times) < 20.0
    assert len(times) == pytest.approx(1000, rel=0.1)
    both = arrivals.poisson(50.0, np.random.default_rng(3), duration_s=20.0, num_requests=10)
    assert both == times[:10]


def test_trace_real_time_and_rescaled():
    trace = [100.0, 101.0, 103.0, 106.0, 110.0]
    assert arrivals.from_trace(trace) == [0.0, 1.0, 3.0, 6.0, 10.0]
    # Whole trace: 4 gaps over 10 s; at 2 req/s it must span 2 s, gaps in the same proportions.
    assert arrivals.from_trace(trace, rate=2.0) == pytest.approx([0.0, 0.2, 0.6, 1.2, 2.0])
    # A window of 2 s at 1 req/s holds 2 requests: the third row lands exactly at the duration.
    window = arrivals.from_trace(trace, rate=1.0, duration_s=2.0)
    assert window == pytest.approx([0.0, 2.0 / 3.0])
    assert arrivals.from_trace(trace, num_requests=2) == [0.0, 1.0]
