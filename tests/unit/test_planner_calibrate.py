"""Calibrating the simulator on live runs: known step costs and overheads come back out of synthetic runs."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pdserve.planner.calibrate import Calibration, Measured, calibrate, main, read_requests, theil_sen
from pdserve.planner.errors import TraceError
from pdserve.planner.perf_model import ProfileSet
from pdserve.planner.replay import main as replay_main

BASE, PER_CTX, PER_TOKEN, DISPATCH, HANDOFF, PER_REQ = 0.012, 2e-6, 2.5e-4, 0.06, 0.03, 0.002


def probe(start, prompt, output, split=True, slow=1.0):
    step = BASE + PER_CTX * (prompt + output / 2)
    steps = -(-prompt // 2048)
    ttft = (DISPATCH + steps * BASE + PER_TOKEN * prompt) * slow
    first = HANDOFF + 2 * (BASE + PER_CTX * prompt) if split else step
    return Measured(start, prompt, output, ttft, (first,) + (step,) * (output - 2))


def probes(split=True, outlier=True):
    sizes = [90, 200, 380, 400, 650, 900, 1300, 1800, 2300, 3000]
    out = [probe(10.0 * i, p, 40, split) for i, p in enumerate(sizes)]
    if outlier:
        out[3] = probe(30.0, 400, 40, split, slow=4.0)  # one request slowed down by a neighbour
    return out


def test_theil_sen_ignores_an_outlier():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    intercept, slope = theil_sen(xs, [3.0, 5.0, 7.0, 40.0, 11.0])
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(1.0)
    assert theil_sen([1.0, 2.0], [5.0, 3.0])[1] == 0.0  # never negative


@pytest.mark.parametrize("design", ["disaggregated", "colocated"])
def test_probes_give_back_the_step_costs_and_overheads(design):
    split = design == "disaggregated"
    cal = calibrate(probes(split), design, shape_profile=None)
    assert cal.decode_base_s == pytest.approx(BASE, rel=0.02)
    assert cal.decode_per_context_s == pytest.approx(PER_CTX, rel=0.05)
    assert cal.prefill_per_token_s == pytest.approx(PER_TOKEN, rel=0.02)
    assert cal.dispatch_s == pytest.approx(DISPATCH, rel=0.05)
    assert cal.handoff_s == (pytest.approx(HANDOFF, rel=0.05) if split else 0.0)
    over = cal.overheads()
    assert over.decode_first_step is split and over.reservation_at_step is split


def test_per_request_cost_from_a_replay():
    # three requests decoding side by side the whole time: each has 2 others beside it
    step = BASE + 2 * PER_REQ + PER_CTX * (500 + 50)
    replay = [Measured(0.0, 500, 100, 0.1, (0.05,) + (step,) * 98) for _ in range(3)]
    cal = calibrate(probes(), "disaggregated", replay=replay)
    assert cal.decode_per_request_s == pytest.approx(PER_REQ, rel=0.05)
    assert cal.decode_step_time(3, 3 * 550) == pytest.approx(BASE + 2 * PER_REQ + PER_CTX * 1650)


def test_without_a_replay_the_offline_profile_gives_the_batch_shape():
    cal = calibrate(probes(), "disaggregated")  # the demo CPU profile: its per-request share of a step
    assert 0.05 * BASE < cal.decode_per_request_s < BASE


def test_profile_csv_and_perf_model_reproduce_the_lines(tmp_path):
    cal = calibrate(probes(), "disaggregated", shape_profile=None)
    cal.decode_per_request_s = PER_REQ
    perf = cal.perf_model()
    assert perf.prefill_time(1000) == pytest.approx(cal.prefill_time(1000))
    assert perf.decode_step_time(8, 8 * 600) == pytest.approx(cal.decode_step_time(8, 8 * 600))
    cal.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == cal
    path = tmp_path / "live.csv"
    assert main([str(_write_run(tmp_path / "probes", probes())), "--design", "disaggregated", "--output",
                 str(tmp_path / "c2.json"), "--profile-csv", str(path), "--shape-profile", str(path.with_name("x"))]) == 2
    assert main([str(tmp_path / "probes"), "--design", "disaggregated", "--output", str(tmp_path / "c2.json"),
                 "--profile-csv", str(path)]) == 0
    from_csv = ProfileSet.from_csv(path).get("demo_model", "cpu-live")
    c2 = Calibration.load(tmp_path / "c2.json")
    for tokens in (100, 1000, 2000):
        assert from_csv.prefill_time(tokens) == pytest.approx(c2.prefill_time(tokens), rel=0.02)
    for batch in (1, 4, 16):
        assert from_csv.decode_step_time(batch, batch * 144) == pytest.approx(
            c2.decode_step_time(batch, batch * 144), rel=0.05)


def _write_run(run, rows):
    run.mkdir(parents=True)
    with open(run / "requests.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("index", "start_s", "prompt_tokens", "max_tokens", "output_tokens", "success",
                                          "ttft_ms", "tpot_ms", "itl_ms"))
        w.writeheader()
        for k, m in enumerate(rows):
            i = m.index if m.index >= 0 else k
            tpot = sum(m.gaps) / len(m.gaps) * 1000
            w.writerow(dict(index=i, start_s=m.start, prompt_tokens=m.prompt, max_tokens=m.output,
                            output_tokens=m.output, success=1, ttft_ms=m.ttft * 1000, tpot_ms=tpot,
                            itl_ms=" ".join(f"{g * 1000:.3f}" for g in m.gaps)))
    return run


def test_isolated_probes_replay_to_what_was_measured(tmp_path, capsys):
    # the probes are isolated requests: simulated with their own calibration they come back as measured
    rows = probes(outlier=False)
    run = _write_run(tmp_path / "probes", rows)
    assert [m.prompt for m in read_requests(run)] == [m.prompt for m in rows]
    assert main([str(run), "--design", "disaggregated", "--output", str(tmp_path / "c.json")]) == 0
    assert replay_main([str(run), "--calibration", str(tmp_path / "c.json"), "--json", str(tmp_path / "r.json")]) == 0
    import json

    table = json.loads((tmp_path / "r.json").read_text())["percentiles"]
    assert abs(table["ttft_p50"]["error"]) < 0.03
    assert abs(table["tpot_p50"]["error"]) < 0.03
    assert "ttft_p50" in capsys.readouterr().out
    assert np.isfinite(table["tpot_p99"]["simulated_ms"])


def test_probes_whose_tokens_came_in_a_burst_are_left_out():
    # a starved front end held a probe's tokens and let them out at once: TTFT ~ E2E, gaps ~0
    held = Measured(500.0, 400, 40, 1.5, (0.00003,) * 39)
    cal = calibrate(probes(outlier=False) + [held], "colocated", shape_profile=None)
    assert cal.fit["burst_probes_left_out"] == 1
    assert cal.dispatch_s == pytest.approx(DISPATCH, rel=0.05)
    with pytest.raises(TraceError):
        calibrate([held] * 5, "colocated", shape_profile=None)


def test_a_loaded_replay_tells_engine_time_from_delay(tmp_path):
    # the truth: of the 60 ms intercept, all is prefill-engine time. A replay simulated with that truth
    # (requests 0.05 s apart, so prompts queue behind each other's engine time) is what "live" measured;
    # the fit must find share 1.0 on it, and 0.0 on one simulated with a pure delay
    from pdserve.planner.calibrate import fit_serial
    from pdserve.planner.replay import calibrated_config, default_pools
    from pdserve.planner.simulator import InstanceSpec, Simulator
    from pdserve.planner.trace import Trace
    from pdserve.router.registry import make_policy

    cal = calibrate(probes(outlier=False), "colocated", shape_profile=None)
    n = 40
    arrival, prompt, output = np.arange(n) * 0.05, np.full(n, 120), np.full(n, 8)
    for share in (1.0, 0.0):
        truth = Calibration(**{**cal.__dict__, "serial_s": share * cal.dispatch_s})
        pools = default_pools("colocated")
        instances = [InstanceSpec(f"{r.value}-{i}", r, "live", truth.perf_model(), 10**6) for r, k in pools.items()
                     for i in range(k)]
        res = Simulator(instances, make_policy("least_loaded"), calibrated_config(truth)).run(
            Trace("t", arrival, prompt, output))
        rows = [Measured(float(a), int(p), int(o), float(t), (float(g),) * (int(o) - 1))
                for a, p, o, t, g in zip(arrival, prompt, output, res.ttft, res.tpot)]
        run = _write_run(tmp_path / f"share{share}", rows)
        assert fit_serial(cal, run).fit["serial_share"] == share


def test_prompts_an_earlier_run_sent_are_in_the_prefix_cache(tmp_path):
    # bench builds prompt i from (seed, i): an earlier run's prompt i is a prefix of this run's
    from pdserve.planner.calibrate import cached_tokens, with_cache

    early = _write_run(tmp_path / "warmup", [Measured(0.0, 300, 8, 0.1, (0.01,) * 7, 0),
                                              Measured(1.0, 900, 8, 0.1, (0.01,) * 7, 1)])
    assert cached_tokens({0: 2000, 1: 401, 2: 500}, [early]) == {0: 288, 1: 400, 2: 0}  # whole 16-token blocks
    hit = with_cache([Measured(0.0, 401, 8, 0.05, (0.01,) * 7, 1)], [early])[0]
    assert hit.cached == 400 and hit.computed == 1


def test_colocated_replay_slope_leaves_the_prefill_stalls_out():
    # the same three requests, each riding through two 0.5 s prefill steps: colocated, the stalls
    # are the simulator's own to add, so the per-request cost is what the plain steps say
    step = BASE + 2 * PER_REQ + PER_CTX * (500 + 50)
    gaps = (0.05,) + (step,) * 48 + (0.5,) + (step,) * 48 + (0.5,)
    replay = [Measured(0.0, 500, 100, 0.1, gaps) for _ in range(3)]
    assert calibrate(probes(split=False), "colocated", replay=replay).decode_per_request_s == pytest.approx(
        PER_REQ, rel=0.05)
    assert calibrate(probes(), "disaggregated", replay=replay).decode_per_request_s > 2 * PER_REQ
