"""`pdserve bench --slo-send` against an SLO-aware gateway on a fake engine: the same SLOs admit and judge."""

from __future__ import annotations

import pytest

from pdserve.gateway.app import GatewayState, create_app
from pdserve.gateway.model import ServedModel
from pdserve.gateway.server import GatewayServer
from pdserve.loadgen import metrics, runner
from pdserve.loadgen.cli import _headers
from pdserve.loadgen.config import ArrivalConfig, BenchConfig, SloConfig, StopConfig, TargetConfig, WorkloadConfig
from pdserve.loadgen.errors import BenchConfigError
from pdserve.router.admission import AdmissionQueue
from pdserve.router.controller import Router
from pdserve.router.latency_model import LatencyModel
from pdserve.router.slo_policy import SloAware
from pdserve.shared.metrics import Metrics
from pdserve.shared.slo_config import SloRoutingConfig
from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan


class Linear:
    def prefill_time(self, batch_tokens: int) -> float:
        return 0.0001 * batch_tokens

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float:
        return 0.010 + 0.001 * batch_size


@pytest.fixture()
def slo_gateway(demo_model_dir):
    model = ServedModel.load("demo", str(demo_model_dir), 512)
    cfg = SloRoutingConfig()
    cfg.admission = cfg.admission.model_copy(update={"interactive_timeout_s": 0.0,
                                                             "slo_margin": 0.0})  # refuse, never queue
    policy = SloAware(cfg, LatencyModel(Linear(), kv_bytes_per_token=0, handoff_latency_s=0, prior=1e12))
    engine = FakeEngineClient.make("mixed-0", max_model_len=512, detokenize=model.decode,
                                   faults=FaultPlan(token_interval_s=0.005))
    router = Router([engine], policy, admission=AdmissionQueue(cfg))
    server = GatewayServer(create_app(GatewayState(model, router, Metrics("demo"), stats_interval_s=0.05, slo=cfg)),
                           "127.0.0.1", 0, log_level="warning")
    url = server.start_in_thread()
    yield url, demo_model_dir
    server.stop()


def test_sent_slos_make_the_server_refuse_what_it_cannot_meet_and_the_report_counts_it(slo_gateway, tmp_path):
    url, model_dir = slo_gateway
    config = BenchConfig(
        target=TargetConfig(base_url=url, model="demo", request_timeout_s=30),
        workload=WorkloadConfig(tokenizer=str(model_dir), input_len=16, output_len=8, max_input_tokens=64,
                                max_output_tokens=8),
        arrivals=ArrivalConfig(kind="closed", concurrency=3), stop=StopConfig(num_requests=12),
        # a batch of one (11 ms a token predicted) meets 11.5 ms, a batch of two does not: at most one runs
        slo=SloConfig(ttft_ms=5000, tpot_ms=11.5, send=True), output_dir=tmp_path, progress=False,
        preflight=False, label="slo", charts=False)
    (data,) = runner.execute(config)
    assert data["rejected"] >= 1 and data["completed"] >= 1
    assert data["rejected"] + data["completed"] == 12
    assert set(data["errors_by_kind"]) == {"http_429"}
    assert data["p99_rejection_ms"] > 0  # measured (how fast is bench_slo.py's figure, not a test's)
    good = data["request_goodput"] * data["duration"]
    assert data["slo_attainment_admitted"] == pytest.approx(good / data["completed"])


def test_slo_headers_and_the_header_flag():
    assert runner.slo_headers(metrics.SloThresholds(ttft_s=0.5, tpot_s=0.02)) == \
        {"x-slo-ttft-ms": "500.000", "x-slo-tpot-ms": "20.000"}
    assert runner.slo_headers(metrics.SloThresholds(e2el_s=1.0)) == {}
    assert _headers(["x-priority=batch", "x-a = b"]) == {"x-priority": "batch", "x-a": "b"}
    with pytest.raises(BenchConfigError):
        _headers(["no-value"])
