"""Metric arithmetic against hand-computed cases (definitions as in vLLM's benchmark)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from pdserve.loadgen import metrics
from pdserve.loadgen.metrics import SloThresholds


@dataclass
class Rec:
    success: bool
    start_s: float = 0.0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error_kind: str = ""


def _records() -> list[Rec]:
    return [
        # A: 4 tokens at 0.10, 0.12, 0.15, 0.20 s -> TPOT (0.2 - 0.1) / 3
        Rec(True, start_s=0.0, ttft_s=0.1, latency_s=0.2, itl_s=[0.02, 0.03, 0.05], output_tokens=4, prompt_tokens=10),
        # B: 2 tokens -> TPOT (0.4 - 0.3) / 1
        Rec(True, start_s=0.5, ttft_s=0.3, latency_s=0.4, itl_s=[0.1], output_tokens=2, prompt_tokens=20),
        # C: one token -> no TPOT sample; TPOT counts as 0 for goodput
        Rec(True, start_s=1.0, ttft_s=0.05, latency_s=0.05, itl_s=[], output_tokens=1, prompt_tokens=5),
        Rec(False, start_s=1.2, error_kind="http_503"),
    ]


def test_tpot_definition():
    a, b, c, _ = _records()
    assert metrics.tpot_s(a) == pytest.approx(0.1 / 3)
    assert metrics.tpot_s(b) == pytest.approx(0.1)
    assert metrics.tpot_s(c) is None


def test_counts_and_throughputs():
    s = metrics.summarize(_records(), duration_s=2.0, percentiles=[50, 90, 99])
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 7)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(21.0)
    assert s["request_goodput"] is None and s["slo_attainment"] is None
    assert s["errors_by_kind"] == {"http_503": 1}


def test_latency_distributions_hand_computed():
    s = metrics.summarize(_records(), duration_s=2.0, percentiles=[50, 90, 99])
    # TTFT sample (ms): 100, 300, 50
    assert s["mean_ttft_ms"] == pytest.approx(150.0)
    assert s["median_ttft_ms"] == pytest.approx(100.0)
    assert s["p90_ttft_ms"] == pytest.approx(260.0)  # linear: 100 + 0.8 * 200
    assert s["p99_ttft_ms"] == pytest.approx(296.0)
    assert s["std_ttft_ms"] == pytest.approx(math.sqrt(35000 / 3))
    # TPOT sample (ms): 33.33, 100 (the one-token request has none)
    assert s["mean_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    assert s["p90_tpot_ms"] == pytest.approx(100 / 3 + 0.9 * (100 - 100 / 3))
    # ITL pooled (ms): 20, 30, 50, 100
    assert s["mean_itl_ms"] == pytest.approx(50.0)
    assert s["median_itl_ms"] == pytest.approx(40.0)
    assert s["p90_itl_ms"] == pytest.approx(85.0)
    # E2E (ms): 200, 400, 50
    assert s["mean_e2el_ms"] == pytest.approx(650 / 3)
    assert s["median_e2el_ms"] == pytest.approx(200.0)


def test_goodput_joint_slos():
    slo = SloThresholds(ttft_s=0.12, tpot_s=0.05)
    s = metrics.summarize(_records(), duration_s=2.0, percentiles=[99], slo=slo)
    # A meets both; B misses TTFT; C meets TTFT and has TPOT 0; the failure meets nothing.
    assert s["request_goodput"] == pytest.approx(2 / 2.0)
    assert s["slo_attainment"] == pytest.approx(2 / 4)


def test_slo_boundary_is_inclusive_and_each_slo_binds():
    a = _records()[0]
    assert metrics.meets_slos(a, SloThresholds(ttft_s=0.1, tpot_s=0.1 / 3, e2el_s=0.2))
    assert not metrics.meets_slos(a, SloThresholds(e2el_s=0.199))
    assert not metrics.meets_slos(a, SloThresholds(tpot_s=0.03))
    assert not metrics.meets_slos(_records()[3], SloThresholds(ttft_s=10.0))


def test_peak_output_rate_buckets():
    tokens, active = metrics.peak_output_rate(_records())
    # A's 4 tokens and B's 2 (0.8 s, 0.9 s) fall in second 0; C's token in second 1.
    assert tokens == 6.0
    assert active == 2


def test_percentile_keys_and_empty_sample():
    assert metrics.percentile_key(99.0) == "p99"
    assert metrics.percentile_key(99.9) == "p99.9"
    out = metrics.distribution_ms([], [99.9], "ttft")
    assert out == {"mean_ttft_ms": 0.0, "median_ttft_ms": 0.0, "std_ttft_ms": 0.0, "p99.9_ttft_ms": 0.0}


def test_all_failed_run_reports_zeros():
    s = metrics.summarize([Rec(False, error_kind="timeout")] * 3, 1.0, [99], SloThresholds(ttft_s=1.0))
    assert s["completed"] == 0 and s["failed"] == 3
    assert s["request_goodput"] == 0.0 and s["slo_attainment"] == 0.0
    assert s["errors_by_kind"] == {"timeout": 3}


def test_unloaded_and_scaled_slos():
    unloaded = metrics.unloaded_latency(_records()[:3])
    assert unloaded.ttft_s == pytest.approx(0.1)  # median of 0.1, 0.3, 0.05
    assert unloaded.tpot_s == pytest.approx((0.1 / 3 + 0.1) / 2)
    slo = metrics.scaled_slos(SloThresholds(e2el_s=1.0), {"ttft": 5.0, "tpot": None, "e2el": None}, unloaded)
    assert slo.ttft_s == pytest.approx(0.5) and slo.tpot_s is None and slo.e2el_s == 1.0
    with pytest.raises(ValueError):
        metrics.scaled_slos(SloThresholds(), {"ttft": 2.0}, None)
