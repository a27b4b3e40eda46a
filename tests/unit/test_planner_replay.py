"""Replaying a bench run's requests in the simulator and comparing percentiles."""

from __future__ import annotations

import csv

import pytest

from pdserve.planner.errors import SpecError
from pdserve.planner.perf_model import ProfileSet
from pdserve.planner.replay import compare, main, parse_pools
from pdserve.planner.simulator import SimConfig
from pdserve.shared.roles import Role

COLS = ("index", "start_s", "prompt_tokens", "max_tokens", "output_tokens", "success", "ttft_ms", "tpot_ms")


def write_run(tmp_path, rows):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "requests.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        w.writeheader()
        for i, (start, prompt, out, ttft, tpot, ok) in enumerate(rows):
            w.writerow(dict(index=i, start_s=start, prompt_tokens=prompt, max_tokens=out, output_tokens=out,
                            success=int(ok), ttft_ms=ttft, tpot_ms=tpot))
    return run


def toy_profile():
    # prefill 100 ms at any size, decode step 10 ms at any batch
    return ProfileSet([dict(model="toy", hardware="cpu", tensor_parallel=1, prompt_size=p, batch_size=1,
                            token_size=0, prompt_time=100, token_time=10) for p in (10, 100)])


def test_isolated_requests_simulate_to_the_profile_times(tmp_path):
    run = write_run(tmp_path, [(100.0, 50, 11, 120, 12, True), (105.0, 50, 11, 110, 11, True),
                               (106.0, 50, 11, "", "", False)])  # failed requests are left out
    out = compare(run, toy_profile(), "toy", "cpu", {Role.MIXED: 1}, 10_000, "least_loaded", SimConfig())
    assert out["requests"] == 2
    p50 = out["percentiles"]["ttft_p50"]
    assert p50["simulated_ms"] == pytest.approx(100.0)
    assert p50["measured_ms"] == pytest.approx(115.0)  # interpolated between 110 and 120
    assert p50["error"] == pytest.approx(-15 / 115)
    assert out["percentiles"]["tpot_p90"]["simulated_ms"] == pytest.approx(10.0)


def test_pools_and_cli(tmp_path, capsys):
    assert parse_pools("prefill=1,decode=2") == {Role.PREFILL: 1, Role.DECODE: 2}
    with pytest.raises(SpecError):
        parse_pools("gpu=3")
    assert main([str(tmp_path / "missing"), "--profile", "x.csv", "--model", "toy"]) == 2


def test_slo_replay_brings_back_the_refused_requests_and_compares_goodput(tmp_path, capsys):
    from pdserve.shared.slo import Priority, RequestSlo

    run = tmp_path / "run"
    run.mkdir()
    cols = COLS + ("error_kind",)
    with open(run / "requests.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerow(dict(index=0, start_s=0.0, prompt_tokens=50, max_tokens=11, output_tokens=11, success=1,
                        ttft_ms=100, tpot_ms=10, error_kind=""))
        w.writerow(dict(index=1, start_s=0.05, prompt_tokens=50, max_tokens=11, output_tokens=0, success=0,
                        ttft_ms="", tpot_ms="", error_kind="http_429"))
        w.writerow(dict(index=2, start_s=0.06, prompt_tokens=50, max_tokens=11, output_tokens=0, success=0,
                        ttft_ms="", tpot_ms="", error_kind="timeout"))  # not a refusal: left out
    (run / "result.json").write_text('{"duration": 2.0}')
    slo = RequestSlo(0.15, 0.05, Priority.INTERACTIVE)
    out = compare(run, toy_profile(), "toy", "cpu", {Role.MIXED: 1}, 10_000, "least_loaded", SimConfig(), slo)
    g = out["goodput"]
    assert out["requests"] == 2
    assert g["admitted"]["measured"] == 1 and g["rejected"]["measured"] == 1
    # simulated: both admitted (least_loaded never refuses); r0 in SLO, r1 queued behind r0's prefill
    # (TTFT 0.15 s, on the target) and its decode batched with r0's
    assert g["admitted"]["simulated"] == 2 and g["good"]["measured"] == 1
    assert g["goodput_rps"]["measured"] == pytest.approx(0.5)
    assert g["goodput_rps"]["simulated"] == pytest.approx(g["good"]["simulated"] / 2.0)
