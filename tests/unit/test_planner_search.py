"""SLOs, designs and the search, on toy machines whose best design is obvious."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.planner.errors import SpecError
from pdserve.planner.hardware import MachineType, ModelSpec, parse_machine
from pdserve.planner.perf_model import Interp1D, PerfModel, ProfileSet
from pdserve.planner.search import Design, Family, Planner, best_at_budget, budget_designs, cheapest_at_rate
from pdserve.planner.simulator import InstanceSpec, SimConfig, Simulator
from pdserve.planner.slo import SloChecker, parse_slo
from pdserve.planner.trace import Trace
from pdserve.router.splitwise import SplitwiseMixedPool
from pdserve.shared.roles import Role


def toy_profiles(speed: dict[str, float]) -> ProfileSet:
    """Prefill 1 ms/token, decode 2 ms/step + 0.5 ms per request in the batch, divided by each machine's speed."""
    rows = []
    for hw, s in speed.items():
        for prompt, batch in ((100, 1), (1000, 1), (2000, 1), (100, 1), (100, 8), (100, 64)):
            rows.append(dict(model="toy", hardware=hw, tensor_parallel=1, prompt_size=prompt, batch_size=batch,
                             token_size=0, prompt_time=prompt * batch / s, token_time=(2 + 0.5 * batch) / s))
    return ProfileSet(rows)


def toy_planner(speed, families_machines, window=None, slos=("ttft_p90=3s", "tpot_p90=40ms")) -> Planner:
    rng = np.random.default_rng(0)
    n = 300
    trace = Trace("toy", np.cumsum(rng.exponential(1.0, n)), rng.integers(200, 1200, n), rng.integers(2, 30, n))
    machines = {name: MachineType(name=name, profile_hardware=name, tensor_parallel=1, cost_per_hour=cost,
                                  power_kw=1.0, memory_gb=10) for name, cost in families_machines.items()}
    model = ModelSpec(name="toy", weight_gb=1, kv_bytes_per_token=100_000)
    return Planner(trace, toy_profiles(speed), model, machines, SloChecker([parse_slo(s) for s in slos]),
                   SplitwiseMixedPool, SimConfig(kv_bytes_per_token=100_000), window=window)


def test_slo_parsing():
    s = parse_slo("TTFT_p99=6x")
    assert (s.metric, s.percentile, s.limit, s.relative) == ("ttft", 99.0, 6.0, True)
    assert parse_slo("tpot_p50=250ms").limit == pytest.approx(0.25)
    assert parse_slo("tbt_p90=1s").metric == "tpot"
    for bad in ("ttft=3x", "ttft_p99=fast", "itl_p50=1s", "ttft_p0=1s"):
        with pytest.raises(SpecError):
            parse_slo(bad)


def test_relative_slos_compare_with_the_request_run_alone():
    perf = PerfModel.constant(1.0, 0.1)
    tr = Trace("t", np.array([0.0, 0.0]), np.array([10, 10]), np.array([11, 11]))
    res = Simulator([InstanceSpec("m", Role.MIXED, "x", perf, 10_000)], SplitwiseMixedPool(), SimConfig()).run(tr)
    # alone: TTFT 1 s. Here r0 prefills alone (1 s) and r1 waits for it (2 s).
    checker = SloChecker([parse_slo("ttft_p50=1x"), parse_slo("ttft_p100=1.5x")], reference=perf)
    report = checker.check(res)
    assert report.values["ttft_p50=1x"] == pytest.approx(1.0)
    assert report.values["ttft_p100=1.5x"] == pytest.approx(2.0)
    assert not report.ok and report.worst == "ttft_p100=1.5x"
    with pytest.raises(SpecError):
        SloChecker([parse_slo("ttft_p50=2x")])  # relative without a reference


def test_rejected_requests_violate_every_slo():
    perf = PerfModel.constant(0.1, 0.01)
    tr = Trace("t", np.array([0.0, 1.0]), np.array([10, 5000]), np.array([5, 5]))  # r1 can never fit
    res = Simulator([InstanceSpec("m", Role.MIXED, "x", perf, 1000)], SplitwiseMixedPool(), SimConfig()).run(tr)
    report = SloChecker([parse_slo("e2e_p90=100s")]).check(res)  # 1 of 2 rejected: p90 is inf
    assert report.rejected == 1 and not report.ok


def test_family_names_and_budgets():
    assert Family.parse("h100/a100").name == "Splitwise-HA"
    assert Family.parse("h100/h100cap").name == "Splitwise-HHcap"
    assert Family.parse("a100").name == "Baseline-A100"
    pl = toy_planner({"x": 1.0}, {"x": 2.0})
    designs = budget_designs(Family.parse("x/x"), pl, 9.0, lambda m: m.cost_per_hour)
    assert [(d.prompt_count, d.token_count) for d in designs] == [(1, 3), (2, 2), (3, 1)]
    assert budget_designs(Family.parse("x"), pl, 9.0, lambda m: m.cost_per_hour) == [Design(Family.parse("x"), 4)]


def test_machine_specs():
    assert parse_machine("a100:cost_per_hour=12").cost_per_hour == 12
    custom = parse_machine("cpu:profile_hardware=cpu,cost_per_hour=1,power_kw=0.2,memory_gb=24,tensor_parallel=1")
    assert custom.tensor_parallel == 1
    with pytest.raises(SpecError):
        parse_machine("cpu:cost_per_hour=1")  # unknown machine, fields missing
    with pytest.raises(SpecError):
        parse_machine("a100:colour=red")


def test_a_faster_machine_at_the_same_price_wins_every_goal():
    pl = toy_planner({"slow": 1.0, "fast": 3.0}, {"slow": 1.0, "fast": 1.0})
    slow, _ = best_at_budget(Family.parse("slow"), pl, 6.0, lambda m: m.cost_per_hour)
    fast, _ = best_at_budget(Family.parse("fast"), pl, 6.0, lambda m: m.cost_per_hour)
    assert fast.rate > 2 * slow.rate > 0
    target = slow.rate
    best, _ = cheapest_at_rate(Family.parse("fast"), pl, target, 8, {"cost": pl.cost})
    assert best["cost"].design.prompt_count <= 3  # a third of the slow machines, give or take one


def test_prefill_heavy_load_gets_most_machines_in_the_prompt_pool():
    # prompts of 200-1200 tokens at 1 ms/token dominate; decode steps are cheap
    pl = toy_planner({"x": 1.0}, {"x": 1.0}, slos=("ttft_p90=3s",))
    best, sweep = best_at_budget(Family.parse("x/x"), pl, 8.0, lambda m: m.cost_per_hour)
    assert best.design.prompt_count >= 6, [(e.design.label(), e.rate) for e in sweep]
    assert best.rate >= max(e.rate for e in sweep)


def test_trace_rescaling_sampling_and_poisson_arrivals():
    tr = Trace("t", np.arange(0.0, 100.0), np.arange(1, 101), np.arange(1, 101))
    fast = tr.at_rate(10.0)
    assert fast.rate == pytest.approx(10.0) and list(fast.prompt) == list(tr.prompt)
    sample = tr.sample(30)
    assert len(sample) == 25 and sample.prompt[1] == 5  # every 4th, spread over the whole trace
    p = tr.poisson(5.0, seed=1)
    assert p.rate == pytest.approx(5.0, rel=0.3) and list(p.output) == list(tr.output)
    assert np.all(np.diff(p.arrival) >= 0)


def test_whole_trace_check_grows_a_design_the_sample_flattered():
    pl = toy_planner({"x": 1.0}, {"x": 1.0}, window=30)
    from pdserve.planner.search import Evaluation

    e = Evaluation(Design(Family.parse("x"), 1), rate=0.8, ok=True, cost_per_hour=1.0, power_kw=1.0)
    pl.validate(e, at_rate=True)
    assert e.full_trace_ok and e.design.prompt_count > 1 and e.grown_from == "Baseline-X 1"
    assert e.cost_per_hour == pl.cost(e.design) and pl.window == 30


def _threshold_planner(search: str, need: int, need_tokens: int | None = None) -> Planner:
    """A planner whose designs hold exactly when the pools have at least `need` (`need_tokens`) machines."""
    from pdserve.planner.slo import SloReport

    pl = toy_planner({"x": 1.0}, {"x": 1.0}, window=30)
    pl.search = search
    tried = []

    def run(design, rate):
        tried.append(design.label())
        ok = design.prompt_count >= need and design.token_count >= (need if need_tokens is None else need_tokens)
        return SloReport(ok, {}, 0, "")

    pl.run, pl.tried = run, tried
    return pl


@pytest.mark.parametrize("search, expected", [("matched", 12), ("legacy", 13)])
def test_whole_trace_growth_bisects_its_last_step(search, expected):
    from pdserve.planner.search import Evaluation

    # 10P+10T fails; 10% steps: 11+11 fails, 13+13 (ceil 12.1) holds; bisection finds 12+12
    pl = _threshold_planner(search, need=12)
    e = Evaluation(Design(Family.parse("x/x"), 10, 10), rate=1.0, ok=True, cost_per_hour=20.0, power_kw=20.0)
    pl.validate(e, at_rate=True)
    assert e.full_trace_ok and (e.design.prompt_count, e.design.token_count) == (expected, expected)
    assert e.grown_from == "Splitwise-xx 10P+10T" and e.cost_per_hour == pl.cost(e.design)


def test_matched_window_offers_the_whole_trace_s_load():
    rng = np.random.default_rng(0)
    n = 3000
    # the first third is light (short prompts, sparse arrivals), the rest is the trace's usual mix
    prompt = np.concatenate([rng.integers(50, 100, n // 3), rng.integers(200, 2000, n - n // 3)])
    gaps = np.concatenate([rng.exponential(3.0, n // 3), rng.exponential(1.0, n - n // 3)])
    tr = Trace("t", np.cumsum(gaps), prompt, rng.integers(2, 300, n))
    w = tr.matched_window(500)
    assert len(w) == 500 and w.arrival[0] == 0.0
    assert w.prompt.mean() == pytest.approx(tr.prompt.mean(), rel=0.1)
    assert w.output.mean() == pytest.approx(tr.output.mean(), rel=0.1)
    # contiguous: bursts kept as they are
    assert any(np.array_equal(tr.prompt[i:i + 500], w.prompt) for i in np.flatnonzero(tr.prompt == w.prompt[0]))
    assert tr.matched_window(None) is tr


def test_whole_trace_check_shrinks_a_design_the_window_was_too_harsh_for():
    from pdserve.planner.search import Evaluation

    pl = _threshold_planner("matched", need=12)
    e = Evaluation(Design(Family.parse("x/x"), 15, 15), rate=1.0, ok=True, cost_per_hour=30.0, power_kw=30.0)
    pl.validate(e, at_rate=True)
    assert e.full_trace_ok and (e.design.prompt_count, e.design.token_count) == (12, 12)
    legacy = _threshold_planner("legacy", need=12)
    e = Evaluation(Design(Family.parse("x/x"), 15, 15), rate=1.0, ok=True, cost_per_hour=30.0, power_kw=30.0)
    legacy.validate(e, at_rate=True)
    assert (e.design.prompt_count, e.grown_from) == (15, None)


def test_whole_trace_check_trims_the_pool_that_proportional_growth_rounded_up():
    from pdserve.planner.search import Evaluation

    # 10P+2T: growing both by 10% steps rounds the 2 token machines up to 3; trimming brings them back
    pl = _threshold_planner("matched", need=15, need_tokens=2)
    e = Evaluation(Design(Family.parse("x/x"), 10, 2), rate=1.0, ok=True, cost_per_hour=12.0, power_kw=12.0)
    pl.validate(e, at_rate=True)
    assert (e.design.prompt_count, e.design.token_count) == (15, 2)
