"""Lifecycle timestamps -> latencies, and their Prometheus rendering."""

from __future__ import annotations

import pytest

from pdserve.shared.lifecycle import Outcome, RequestLifecycle
from pdserve.shared.metrics import Metrics
from pdserve.shared.protocol import EngineStats
from pdserve.shared.roles import Role


def test_latencies_from_hand_timeline():
    life = RequestLifecycle("r", arrival=10.0)
    life.mark_tokens(1, now=10.5)  # TTFT 0.5
    life.mark_tokens(2, now=10.7)  # two tokens in one delta: one arrival
    life.mark_tokens(1, now=11.0)
    life.finish(Outcome.OK, now=11.1)
    assert life.ttft == pytest.approx(0.5)
    assert life.e2e == pytest.approx(1.1)
    assert life.num_output_tokens == 4
    assert life.tpot == pytest.approx((11.0 - 10.5) / 3)
    assert life.inter_token == pytest.approx([0.2, 0.3])


def test_first_outcome_wins_and_single_token_has_no_tpot():
    life = RequestLifecycle("r", arrival=0.0)
    life.mark_tokens(1, now=1.0)
    life.finish(Outcome.ABORTED, now=2.0)
    life.finish(Outcome.ERROR, now=3.0)
    assert life.outcome is Outcome.ABORTED and life.e2e == 2.0
    assert life.tpot is None


def test_metrics_render_vllm_style_names():
    metrics = Metrics("m")
    life = RequestLifecycle("r", arrival=0.0, num_prompt_tokens=5)
    life.mark_tokens(1, now=0.2)
    life.mark_tokens(1, now=0.3)
    life.finish(Outcome.OK, now=0.3)
    metrics.observe_request(life, ["length"])
    metrics.observe_instance(EngineStats("mixed-0", Role.MIXED, num_running=3, kv_usage=0.25))
    text = metrics.render().decode()
    assert 'pdserve:requests_total{model_name="m",outcome="ok"} 1.0' in text
    assert 'pdserve:request_success_total{finished_reason="length",model_name="m"} 1.0' in text
    assert 'pdserve:prompt_tokens_total{model_name="m"} 5.0' in text
    assert 'pdserve:time_to_first_token_seconds_bucket{le="0.25",model_name="m"} 1.0' in text
    assert 'pdserve:num_requests_running{instance="mixed-0",model_name="m",role="mixed"} 3.0' in text
    assert 'pdserve:kv_cache_usage_perc{instance="mixed-0",model_name="m",role="mixed"} 0.25' in text


def test_rejected_requests_count_but_record_no_latency():
    metrics = Metrics("m")
    life = RequestLifecycle("r", arrival=0.0)
    life.finish(Outcome.REJECTED, now=0.0)
    metrics.observe_request(life, [])
    text = metrics.render().decode()
    assert 'outcome="rejected"} 1.0' in text
    assert "pdserve:e2e_request_latency_seconds_count" not in text  # no latency sample at all
