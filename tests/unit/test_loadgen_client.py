"""Client and runner end to end against an in-process fake OpenAI streaming server."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from pdserve.loadgen import runner
from pdserve.loadgen.compare import compare
from pdserve.loadgen.config import ArrivalConfig, BenchConfig, SloConfig, StopConfig, TargetConfig, WorkloadConfig
from pdserve.loadgen.errors import TargetUnavailableError
from pdserve.loadgen.fake_server import FakeServer, FakeServerConfig
from pdserve.loadgen.prompts import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = next((p for p in (REPO / "services" / "demo_model", Path("/tmp/smoke_model"))
                  if (p / "tokenizer.json").is_file()), None)
SHARED_TRACES = REPO / ".." / "shared" / "traces"
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="no demo model tokenizer")


def make_config(base_url: str, out: Path, *, endpoint="/v1/completions", kind="poisson", rate=50.0,
                num=None, duration=None, concurrency=None, slo=None, preflight=True, timeout=30.0,
                api_key=None, trace=None, sweep=None, output_len=8, charts=False) -> BenchConfig:
    return BenchConfig(
        target=TargetConfig(base_url=base_url, endpoint=endpoint, model="fake-model", api_key=api_key,
                            request_timeout_s=timeout),
        workload=WorkloadConfig(tokenizer=str(MODEL_DIR), input_len=32, output_len=output_len, trace=trace,
                                trace_dir=SHARED_TRACES, max_input_tokens=256, max_output_tokens=8),
        arrivals=ArrivalConfig(kind=kind, rate=rate, concurrency=concurrency),
        stop=StopConfig(num_requests=num, duration_s=duration), slo=slo or SloConfig(),
        output_dir=out, progress=False, preflight=preflight, sweep_rates=sweep, label="t", charts=charts)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_completions_run_counts_failures_with_reasons(tmp_path):
    fake = FakeServerConfig(ttft_s=0.03, itl_s=0.004, fail_every=5, drop_every=4)
    with FakeServer(fake) as server:
        (data,) = runner.execute(make_config(server.base_url, tmp_path, num=12, charts=True,
                                             slo=SloConfig(ttft_ms=1000, tpot_ms=1000)))
        received = server.app.received
    # Server request 1 is the preflight; 5 and 10 get 503, 4, 8 and 12 are cut mid-stream.
    assert len(received) == 13
    assert data["completed"] == 7 and data["failed"] == 5
    assert data["errors_by_kind"] == {"http_503": 2, "stream_dropped": 3}
    assert any("503" in e for e in data["error_examples"])
    assert data["total_output_tokens"] == 7 * 8
    assert data["request_goodput"] == pytest.approx(7 / data["duration"])
    assert data["slo_attainment"] == pytest.approx(7 / 12)
    assert data["mean_ttft_ms"] >= 30.0
    assert 3.5 <= data["median_itl_ms"] < 50.0
    payload = received[1]["payload"]
    assert payload["ignore_eos"] is True and payload["stream"] is True
    assert payload["model"] == "fake-model" and payload["max_tokens"] == 8
    assert payload["stream_options"] == {"include_usage": True}

    rows = read_csv(tmp_path / "requests.csv")
    assert len(rows) == 12
    ok = [r for r in rows if r["success"] == "1"]
    assert all(len(r["itl_ms"].split()) == 7 for r in ok)  # 8 tokens -> 7 gaps
    for r in ok:  # TPOT = (E2E - TTFT) / (tokens - 1), as vLLM defines it
        assert float(r["tpot_ms"]) == pytest.approx((float(r["e2el_ms"]) - float(r["ttft_ms"])) / 7, abs=2e-3)
    assert {r["error_kind"] for r in rows if r["success"] == "0"} == {"http_503", "stream_dropped"}
    assert all(r["prompt_tokens"] == "32" for r in rows)
    assert (tmp_path / "latency_cdf.png").stat().st_size > 10_000
    on_disk = json.loads((tmp_path / "result.json").read_text())
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                "median_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "request_goodput", "completed",
                "failed", "duration", "total_input_tokens", "total_output_tokens", "max_concurrent_requests"):
        assert key in on_disk


def test_stream_without_done_is_a_failure(tmp_path):
    fake = FakeServerConfig(ttft_s=0.01, itl_s=0.001, drop_every=2, drop_after=3, drop_mode="truncate")
    with FakeServer(fake) as server:
        (data,) = runner.execute(make_config(server.base_url, tmp_path, num=4, preflight=False))
    assert data["errors_by_kind"] == {"stream_dropped": 2}
    assert any("without [DONE] after 3 token messages" in e for e in data["error_examples"])


def test_chat_with_api_key_skips_the_role_message(tmp_path):
    fake = FakeServerConfig(ttft_s=0.15, itl_s=0.002, api_key="sekret", report_usage=False)
    with FakeServer(fake) as server:
        (data,) = runner.execute(make_config(server.base_url + "/v1", tmp_path, endpoint="/v1/chat/completions",
                                             num=3, api_key="sekret"))
        received = server.app.received
    assert data["completed"] == 3
    assert data["mean_ttft_ms"] >= 150.0  # the role message arrives at once but is not a token
    assert received[0]["path"] == "/v1/chat/completions"
    assert received[0]["headers"]["authorization"] == "Bearer sekret"
    assert received[0]["payload"]["max_completion_tokens"] == 2  # the preflight
    assert received[1]["payload"]["max_completion_tokens"] == 8
    assert received[0]["payload"]["messages"][0]["role"] == "user"
    # No usage message: output tokens are counted with the tokenizer, as vLLM does.
    tok = load_tokenizer(str(MODEL_DIR))
    assert data["total_output_tokens"] == 3 * len(tok(" tok" * 8, add_special_tokens=False)["input_ids"])
    assert "sekret" not in (tmp_path / "result.json").read_text()


def test_wrong_api_key_fails_with_http_401(tmp_path):
    with FakeServer(FakeServerConfig(api_key="right")) as server:
        (data,) = runner.execute(make_config(server.base_url, tmp_path, num=2, api_key="wrong", preflight=False))
    assert data["completed"] == 0 and data["errors_by_kind"] == {"http_401": 2}


def test_closed_loop_keeps_concurrency(tmp_path):
    with FakeServer(FakeServerConfig(ttft_s=0.02, itl_s=0.003)) as server:
        (data,) = runner.execute(make_config(server.base_url, tmp_path, kind="closed", rate=None, concurrency=3,
                                             num=9, preflight=False))
        assert server.app.max_in_flight == 3
    assert data["completed"] == 9 and data["max_concurrency"] == 3 and data["request_rate"] == "inf"


def test_timeout_is_counted(tmp_path):
    with FakeServer(FakeServerConfig(ttft_s=0.6)) as server:
        (data,) = runner.execute(make_config(server.base_url, tmp_path, num=2, timeout=0.2, preflight=False))
    assert data["errors_by_kind"] == {"timeout": 2}


def test_preflight_against_a_closed_port_stops_the_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TargetUnavailableError, match="preflight"):
        runner.execute(make_config(f"http://127.0.0.1:{port}", tmp_path, num=2))


def test_slo_as_multiple_of_unloaded_latency(tmp_path):
    with FakeServer(FakeServerConfig(ttft_s=0.05, itl_s=0.002)) as server:
        (data,) = runner.execute(make_config(server.base_url, tmp_path, num=4,
                                             slo=SloConfig(ttft_x=4.0, unloaded_probes=2)))
    unloaded = data["unloaded_latency_ms"]
    assert unloaded["ttft"] >= 50.0
    assert data["slo_ms"] == {"ttft": pytest.approx(4.0 * unloaded["ttft"])}
    assert data["request_goodput"] is not None


@pytest.mark.skipif(not (SHARED_TRACES / "AzureLLMInferenceTrace_conv.csv").is_file(), reason="no traces")
def test_conv_trace_replay_rescaled(tmp_path):
    with FakeServer(FakeServerConfig(ttft_s=0.005, itl_s=0.001)) as server:
        (data,) = runner.execute(make_config(server.base_url, tmp_path, kind="trace", rate=20.0, duration=1.0,
                                             trace="conv"))
        received = server.app.received[1:]
    assert data["num_prompts"] == 20 and data["completed"] == 20
    assert data["clipped_requests"] > 0  # conv prompts run past the 256-token clip
    # The first conv rows (374/44, 396/109 tokens) under the 256/8 clips:
    assert [p["payload"]["max_tokens"] for p in received[:2]] == [8, 8]
    rows = read_csv(tmp_path / "requests.csv")
    assert [int(r["prompt_tokens"]) for r in rows[:2]] == [256, 256]
    assert float(rows[-1]["scheduled_s"]) < 1.0


def test_sweep_writes_points_and_compare_charts_them(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    with FakeServer(FakeServerConfig(ttft_s=0.005, itl_s=0.001)) as server:
        results = runner.execute(make_config(server.base_url, sweep_dir, rate=None, duration=0.5,
                                             sweep=[10.0, 30.0], slo=SloConfig(ttft_ms=500)))
    assert len(results) == 2
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert [p["request_rate"] for p in points] == [10.0, 30.0]
    assert [p["run_dir"] for p in points] == ["rate_10", "rate_30"]
    assert all(p["failed"] == 0 and p["completed"] >= 1 for p in points)
    assert all(p["slo_attainment"] == 1.0 for p in points)
    assert (sweep_dir / "rate_30" / "requests.csv").is_file()
    # Two sweeps side by side: the second one "serves" half as much.
    other = tmp_path / "other"
    other.mkdir()
    halved = [{**p, "request_throughput": p["request_throughput"] / 2} for p in points]
    (other / "sweep.json").write_text(json.dumps({"points": halved}))
    written = compare([sweep_dir, other], tmp_path / "cmp", labels=["base", "half"])
    assert {p.name for p in written} == {"compare_sweep_throughput.png", "compare_sweep_slo_attainment.png"}
    assert "×0.50" in capsys.readouterr().out


def _spec():
    from pdserve.loadgen.client import RequestSpec
    from pdserve.loadgen.prompts import Prompt

    return RequestSpec(0, Prompt("hello", 1, None), 4, 0.0)


def test_sampling_flags_reach_every_request():
    import argparse

    from pdserve.loadgen.cli import add_arguments, build_config
    from pdserve.loadgen.client import build_payload

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--base-url", "http://127.0.0.1:1", "--model", "m", "--num-requests", "1", "--rate", "1",
                              "--temperature", "0", "--top-p", "0.9", "--top-k", "5",
                              "--extra-body", '{"seed": 3, "min_tokens": 2}'])
    target = build_config(args).target
    payload = build_payload(target, _spec())
    assert (payload["temperature"], payload["top_p"], payload["top_k"]) == (0.0, 0.9, 5)
    assert payload["seed"] == 3 and payload["min_tokens"] == 2
    # Unset: the server's defaults (OpenAI's temperature 1), nothing sent.
    args = parser.parse_args(["--base-url", "http://127.0.0.1:1", "--model", "m", "--num-requests", "1", "--rate", "1"])
    assert "temperature" not in build_payload(build_config(args).target, _spec())
