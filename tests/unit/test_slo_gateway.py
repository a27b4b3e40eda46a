"""Per-request SLOs through the gateway against fake engines: headers and fields, 400s, 429s, queueing, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from pdserve.gateway.app import GatewayState, create_app
from pdserve.gateway.model import ServedModel
from pdserve.gateway.server import GatewayServer
from pdserve.gateway.slo import request_slo
from pdserve.router.admission import AdmissionQueue
from pdserve.router.controller import Router
from pdserve.router.latency_model import LatencyModel
from pdserve.router.slo_policy import SloAware
from pdserve.shared.errors import InvalidRequestError
from pdserve.shared.metrics import Metrics
from pdserve.shared.slo import Priority, RequestSlo
from pdserve.shared.slo_config import SloRoutingConfig
from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan

MODEL = "demo"
MAX_LEN = 256


class Linear:
    """prefill: 0.1 ms a token; decode step: 10 ms + 1 ms per request in the batch."""

    def prefill_time(self, batch_tokens: int) -> float:
        return 0.0001 * batch_tokens

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float:
        return 0.010 + 0.001 * batch_size


@pytest.fixture(scope="module")
def served_model(demo_model_dir) -> ServedModel:
    return ServedModel.load(MODEL, str(demo_model_dir), MAX_LEN)


class SloGateway:
    def __init__(self, model: ServedModel, token_interval_s: float = 0.0, **admission) -> None:
        admission.setdefault("slo_margin", 0.0)  # exact arithmetic on the Linear model
        cfg = SloRoutingConfig()
        cfg.admission = cfg.admission.model_copy(update=admission)
        self.config = cfg
        # a calibration too weak to move the predictions within a test
        self.policy = SloAware(cfg, LatencyModel(Linear(), kv_bytes_per_token=0, handoff_latency_s=0, prior=1e12))
        self.engine = FakeEngineClient.make("mixed-0", max_model_len=MAX_LEN, detokenize=model.decode,
                                            faults=FaultPlan(token_interval_s=token_interval_s))
        router = Router([self.engine], self.policy, admission=AdmissionQueue(cfg))
        self.router = router
        app = create_app(GatewayState(model, router, Metrics(MODEL), stats_interval_s=0.05, slo=cfg))
        self.server = GatewayServer(app, "127.0.0.1", 0, log_level="warning")
        self.url = self.server.start_in_thread()

    def post(self, body: dict, headers: dict | None = None, path: str = "/v1/completions") -> httpx.Response:
        return httpx.post(self.url + path, content=json.dumps({"model": MODEL, **body}),
                          headers={"content-type": "application/json", **(headers or {})}, timeout=30)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text


@pytest.fixture()
def gateway(served_model):
    gw = SloGateway(served_model)
    yield gw
    gw.server.stop()


@pytest.fixture(scope="module")
def shared_gateway(served_model):
    """One gateway for the tests that only read their own responses."""
    gw = SloGateway(served_model)
    yield gw
    gw.server.stop()


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


BAD = [
    ({"x-slo-ttft-ms": "soon"}, {}, "x-slo-ttft-ms"),
    ({"x-slo-ttft-ms": "-5"}, {}, "x-slo-ttft-ms"),
    ({"x-slo-ttft-ms": "0"}, {}, "x-slo-ttft-ms"),
    ({"x-slo-tpot-ms": "nan"}, {}, "x-slo-tpot-ms"),
    ({"x-slo-tpot-ms": "inf"}, {}, "x-slo-tpot-ms"),
    ({"x-slo-tpot-ms": "1e12"}, {}, "x-slo-tpot-ms"),
    ({"x-priority": "urgent"}, {}, "x-priority"),
    ({}, {"slo_ttft_ms": "fast"}, "slo_ttft_ms"),
    ({}, {"slo_tpot_ms": True}, "slo_tpot_ms"),
    ({}, {"slo_tpot_ms": [50]}, "slo_tpot_ms"),
    ({}, {"slo_priority": 3}, "slo_priority"),
]


@pytest.mark.parametrize("headers,fields,param", BAD)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_slo_values_are_openai_400s_naming_the_header_or_field(shared_gateway, headers, fields, param, path):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = _error(shared_gateway.post({**body, "max_tokens": 2, **fields}, headers, path), 400)
    assert error["param"] == param and param in error["message"]


def test_headers_win_over_fields_over_class_defaults():
    cfg = SloRoutingConfig()

    class Body:
        model_extra = {"slo_ttft_ms": 900, "slo_tpot_ms": "40", "slo_priority": "batch"}

    assert request_slo({}, Body(), cfg) == RequestSlo(0.9, 0.04, Priority.BATCH)
    assert request_slo({"x-slo-ttft-ms": "250", "x-priority": "Interactive"}, Body(), cfg) == \
        RequestSlo(0.25, 0.04, Priority.INTERACTIVE)
    assert request_slo({"x-priority": "batch"}, object(), cfg) == RequestSlo(30.0, 1.0, Priority.BATCH)
    with pytest.raises(InvalidRequestError):
        request_slo({"x-slo-ttft-ms": ""}, object(), cfg)


def test_a_met_slo_is_counted_with_its_prediction_ratios(gateway):
    resp = gateway.post({"prompt": "hi", "max_tokens": 4, "slo_tpot_ms": 500}, {"x-slo-ttft-ms": "5000"})
    assert resp.status_code == 200, resp.text
    text = gateway.metrics()
    assert 'pdserve:slo_requests_total{model_name="demo",priority="interactive",result="met"} 1.0' in text
    assert 'pdserve:slo_attainment{model_name="demo",priority="interactive"} 1.0' in text
    assert 'pdserve:placement_decisions_total{model_name="demo",reason="placed"} 1.0' in text
    assert 'pdserve:ttft_prediction_ratio_count{model_name="demo"} 1.0' in text
    assert 'pdserve:tpot_prediction_ratio_count{model_name="demo"} 1.0' in text


def test_a_missed_tpot_counts_as_missed(served_model):
    gw = SloGateway(served_model, token_interval_s=0.03)
    try:
        # predicted 11 ms a token fits the 20 ms target; the engine takes 30 ms
        assert gw.post({"prompt": "hi", "max_tokens": 4}, {"x-slo-tpot-ms": "20"}).status_code == 200
        text = gw.metrics()
        assert 'pdserve:slo_requests_total{model_name="demo",priority="interactive",result="tpot_missed"} 1.0' \
            in text
        assert 'pdserve:slo_attainment{model_name="demo",priority="interactive"} 0.0' in text
    finally:
        gw.server.stop()


def test_an_unmeetable_ttft_is_a_quick_429_with_retry_after(gateway):
    resp = gateway.post({"prompt": "hi there", "max_tokens": 4}, {"x-slo-ttft-ms": "0.001"})
    error = _error(resp, 429)
    assert error["type"] == "RateLimitError" and "ttft_unmet" in error["message"]
    assert "exceeds the 0 ms target" in error["message"]
    assert int(resp.headers["retry-after"]) >= 1
    assert gateway.engine.submitted == []  # refused by the policy at once: never queued, never sent
    text = gateway.metrics()
    assert 'pdserve:rejections_total{model_name="demo",priority="interactive",reason="ttft_unmet"} 1.0' in text
    assert 'pdserve:requests_total{model_name="demo",outcome="rejected"} 1.0' in text


def test_a_full_decode_batch_queues_the_next_request_until_the_first_finishes(served_model):
    gw = SloGateway(served_model, token_interval_s=0.02)
    try:
        # TPOT target 11.5 ms: a batch of one (11 ms) fits, a batch of two (12 ms) does not
        headers = {"x-slo-tpot-ms": "11.5", "x-slo-ttft-ms": "3000"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(gw.post, {"prompt": "one", "max_tokens": 30}, headers)
            time.sleep(0.2)
            started = time.monotonic()
            second = pool.submit(gw.post, {"prompt": "two", "max_tokens": 2}, headers)
            assert first.result().status_code == 200
            assert second.result().status_code == 200, second.result().text
            waited = time.monotonic() - started
        assert waited > 0.2  # it waited for the first to end
        text = gw.metrics()
        assert 'pdserve:admission_queue_wait_seconds_count{model_name="demo",outcome="admitted",' \
               'priority="interactive"} 1.0' in text
        assert 'pdserve:placement_decisions_total{model_name="demo",reason="tpot_unmet"}' in text
        assert 'pdserve:admission_queue_depth{model_name="demo",priority="interactive"} 0.0' in text
    finally:
        gw.server.stop()


def test_a_request_whose_forecast_slot_comes_after_its_deadline_is_refused_at_once(served_model):
    gw = SloGateway(served_model, token_interval_s=0.05, interactive_timeout_s=0.2)
    try:
        headers = {"x-slo-tpot-ms": "11.5"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(gw.post, {"prompt": "one", "max_tokens": 30}, headers)
            time.sleep(0.2)
            # the first has ~26 tokens left at a predicted 11 ms: its slot frees in ~0.29 s > 0.2 s
            second = gw.post({"prompt": "two", "max_tokens": 2}, headers)
            error = _error(second, 429)
            assert "tpot_unmet" in error["message"] and "forecast in" in error["message"]
            assert first.result().status_code == 200
        text = gw.metrics()
        assert 'reason="tpot_unmet"} 1.0' in text and 'reason="queue_deadline"' not in text
        assert 'outcome="rejected"' not in text.split("admission_queue_wait_seconds_count")[-1].split("\n")[0]
    finally:
        gw.server.stop()


def test_a_queued_request_whose_forecast_slips_is_refused_before_its_deadline(served_model):
    # forecast in time at first (the model says 11 ms a token), but the engine takes 50 ms: each retry
    # forecasts the slot later, and the one that finds it past the deadline refuses it (no deadline 429)
    gw = SloGateway(served_model, token_interval_s=0.05, interactive_timeout_s=0.5)
    try:
        headers = {"x-slo-tpot-ms": "11.5"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(gw.post, {"prompt": "one", "max_tokens": 30}, headers)
            time.sleep(0.2)
            second = gw.post({"prompt": "two", "max_tokens": 2}, headers)
            error = _error(second, 429)
            assert "tpot_unmet" in error["message"] and "forecast in" in error["message"]
            assert second.headers["retry-after"]
            assert first.result().status_code == 200
        text = gw.metrics()
        assert 'reason="tpot_unmet"} 1.0' in text and 'reason="queue_deadline"' not in text
        assert 'pdserve:admission_queue_wait_seconds_count{model_name="demo",outcome="rejected",' \
               'priority="interactive"} 1.0' in text  # it waited, then was refused
    finally:
        gw.server.stop()
