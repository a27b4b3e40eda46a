"""`pdserve simulate`: designs, workloads (resampling keeps the length distribution), bench-compatible files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pdserve.cli.main import main
from pdserve.loadgen import report
from pdserve.loadgen.config import SloConfig
from pdserve.loadgen.traces import Trace as LoadgenTrace
from pdserve.planner.errors import SpecError
from pdserve.planner.simulate import design_from_config, parse_design
from pdserve.planner.workload import WorkloadSpec, bench_config, build, resample

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def ks_critical(n: int, m: int, alpha: float = 0.01) -> float:
    return float(np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m)))


def test_ks_statistic_by_hand():
    assert ks_statistic(np.array([1, 2, 3]), np.array([1, 2, 3])) == 0.0
    assert ks_statistic(np.array([1, 2]), np.array([3, 4])) == 1.0
    assert ks_statistic(np.array([1, 2, 3, 4]), np.array([3, 4, 5, 6])) == pytest.approx(0.5)


@pytest.mark.skipif(not CONV.is_file(), reason="conv trace not in ../shared/traces")
def test_resampling_keeps_the_length_distribution():
    from pdserve.loadgen.traces import parse

    src = parse(CONV, "conv")
    prompt, output = np.array(src.context_tokens), np.array(src.generated_tokens)
    p, o = resample(prompt, output, 10_000, np.random.default_rng(7))
    for drawn, whole in ((p, prompt), (o, output)):
        assert ks_statistic(drawn, whole) < ks_critical(10_000, len(whole))
    # and a visibly different distribution is caught by the same test
    assert ks_statistic(p[p > np.median(prompt)], prompt) > ks_critical(5_000, len(prompt))


def _source(n=50) -> LoadgenTrace:
    rng = np.random.default_rng(0)
    return LoadgenTrace("toy", tuple(np.cumsum(rng.exponential(1.0, n)) - 0.0),
                        tuple(int(x) for x in rng.integers(10, 100, n)), tuple(int(x) for x in rng.integers(2, 9, n)))


def _build(tmp_path, source, **spec):
    s = WorkloadSpec(**spec)
    return build(s, bench_config(s, "m", tmp_path, None, SloConfig(), [50.0], False), source)


def test_within_the_trace_the_workload_is_bench_s_plan(tmp_path):
    from pdserve.loadgen.workload import plan_open_loop

    src = _source()
    spec = WorkloadSpec(trace="toy", arrival="trace", rate=2.0, duration_s=10)
    trace, resampled = _build(tmp_path, src, trace="toy", arrival="trace", rate=2.0, duration_s=10)
    plan = plan_open_loop(bench_config(spec, "m", tmp_path, None, SloConfig(), [50.0], False), src)
    assert not resampled and len(trace) == len(plan) == 20
    assert trace.prompt.tolist() == [p.input_tokens for p in plan]
    np.testing.assert_allclose(trace.arrival, [p.send_at_s for p in plan])


def test_past_the_trace_lengths_are_resampled_and_seeded(tmp_path):
    src = _source()
    a, resampled = _build(tmp_path, src, trace="toy", arrival="poisson", rate=20.0, duration_s=10, seed=3)
    b, _ = _build(tmp_path, src, trace="toy", arrival="poisson", rate=20.0, duration_s=10, seed=3)
    c, _ = _build(tmp_path, src, trace="toy", arrival="poisson", rate=20.0, duration_s=10, seed=4)
    assert resampled and len(a) > len(src)
    assert a.prompt.tolist() == b.prompt.tolist() and a.prompt.tolist() != c.prompt.tolist()
    assert set(a.prompt.tolist()) <= set(src.context_tokens)
    tiled, resampled = _build(tmp_path, src, trace="toy", arrival="trace", rate=20.0, duration_s=10)
    assert resampled and 150 < len(tiled) < 250 and tiled.arrival.max() < 10
    assert np.all(np.diff(tiled.arrival) >= 0)


def test_designs_from_pools_and_from_a_config(tmp_path):
    d = parse_design("h100/a100:25+15")
    assert (d.family.prompt, d.family.token, d.prompt_count, d.token_count) == ("h100", "a100", 25, 15)
    assert parse_design("h100:40").label() == "Baseline-H100 40"
    for bad in ("h100", "h100:x", "h100/a100:3", "h100:0"):
        with pytest.raises(SpecError):
            parse_design(bad)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pools: {prefill: 3, decode: 2}\ngateway: {routing_policy: kv_jsq}\n")
    design, policy = design_from_config(cfg, "h100/a100")
    assert design.label() == "Splitwise-HA 3P+2T" and policy == "kv_jsq"
    cfg.write_text("pools: {mixed: 4, prefill: 0, decode: 0}\n")
    assert design_from_config(cfg, "a100")[0].label() == "Baseline-A100 4"


def _toy_profile(tmp_path) -> Path:
    from pdserve.planner.perf_model import COLUMNS

    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for prompt, batch in ((100, 1), (1000, 1), (100, 8), (100, 32)):
            w.writerow(dict(model="toy", hardware="cpu", prompt_size=prompt, batch_size=batch, token_size=10,
                            peak_power=0, average_power=0, prompt_time=prompt * batch * 0.5,
                            token_time=5 + 0.5 * batch, e2e_time=0, tensor_parallel=1))
    return path


def test_cli_writes_bench_files_and_repeats_report_their_spread(tmp_path, capsys):
    out = tmp_path / "sim"
    machine = "cpu:profile_hardware=cpu,tensor_parallel=1,cost_per_hour=1,power_kw=0.2,memory_gb=10"
    argv = ["simulate", "--pools", "cpu/cpu:1+1", "--input-len", "200", "--output-len", "20", "--rate", "2",
            "--duration", "20", "--profile", str(_toy_profile(tmp_path)), "--model", "toy", "--weight-gb", "1",
            "--kv-bytes-per-token", "1000", "--machine", machine, "--slo-reference", "cpu", "--output-dir",
            str(out), "--no-charts", "--repeats", "3", "--arrival", "poisson"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Request goodput" in printed and "percentile SLOs" in printed and "request_throughput" in printed
    run = report.load_run(out / "repeat_0")  # what `pdserve bench compare` reads
    assert run.result["simulated"] and run.result["request_goodput"] is not None
    with open(out / "repeat_0" / "requests.csv", newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == report.CSV_COLUMNS
    spread = json.loads((out / "repeats.json").read_text())
    assert spread["seeds"] == [0, 1, 2] and spread["spread"]["request_throughput"]["std"] > 0
    assert main(["bench", "compare", str(out / "repeat_0"), str(out / "repeat_1"), "--output-dir",
                 str(tmp_path / "cmp")]) == 0


def test_cli_reports_user_errors(tmp_path, capsys):
    base = ["simulate", "--model", "llama2-70b", "--output-dir", str(tmp_path / "o"), "--rate", "1", "--duration", "5"]
    assert main(base) == 2
    assert "give one design" in capsys.readouterr().err
    assert main(base + ["--pools", "h100:2", "--policy", "nope"]) == 2
    assert "unknown routing policy" in capsys.readouterr().err


def test_cli_slo_aware_with_sent_slos_refuses_what_it_cannot_serve(tmp_path, capsys):
    # 12 req/s of 200-token prompts on one 1+1 pair whose prefill takes 0.1 s: with a 250 ms TTFT
    # target sent with every request, slo_aware refuses some; with the config's default (2 s) fewer
    machine = "cpu:profile_hardware=cpu,tensor_parallel=1,cost_per_hour=1,power_kw=0.2,memory_gb=10"
    base = ["simulate", "--pools", "cpu/cpu:1+1", "--input-len", "200", "--output-len", "20", "--rate", "12",
            "--duration", "20", "--profile", str(_toy_profile(tmp_path)), "--model", "toy", "--weight-gb", "1",
            "--kv-bytes-per-token", "1000", "--machine", machine, "--slo-reference", "cpu", "--no-charts",
            "--arrival", "poisson", "--policy", "slo_aware", "--slo-ttft-ms", "250", "--slo-tpot-ms", "1000"]
    assert main(base + ["--output-dir", str(tmp_path / "sent"), "--slo-send"]) == 0
    assert main(base + ["--output-dir", str(tmp_path / "unsent")]) == 0
    sent = json.loads((tmp_path / "sent" / "result.json").read_text())
    unsent = json.loads((tmp_path / "unsent" / "result.json").read_text())
    assert sent["failed"] > 0 and sent["completed"] > 0
    assert unsent["failed"] < sent["failed"]
