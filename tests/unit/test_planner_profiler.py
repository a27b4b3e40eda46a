"""`pdserve profile`'s measurement, against a fake engine whose timings are known."""

from __future__ import annotations

import pytest

from pdserve.planner.errors import SpecError
from pdserve.planner.perf_model import ProfileSet
from pdserve.planner.profiler import ProfilePlan, Profiler, write_profile


def fake_engine(calls: list):
    """Prefill 1 ms + 10 us/token; decode step 2 ms + 0.1 ms per request + 1 us per context token."""

    def generate(prompts, max_tokens):
        calls.append((len(prompts), len(prompts[0]), max_tokens))
        b, p = len(prompts), len(prompts[0])
        prefill = 1e-3 + 1e-5 * b * p
        decode = sum(2e-3 + 1e-4 * b + 1e-6 * b * (p + 1 + k) for k in range(max_tokens - 1))
        return prefill + decode

    return generate


def test_profile_round_trips_through_the_perf_model(tmp_path):
    calls: list = []
    plan = ProfilePlan(prompt_sizes=[16, 128, 512], batch_sizes=[1, 4, 16], ref_prompt=128, decode_tokens=9,
                       repeats=2, vocab_size=100)
    rows = Profiler(fake_engine(calls), plan, "fake", "cpu", log=lambda s: None).run()
    assert len(rows) == 2 * (3 + 2)  # 3 prompt sizes + batches 4 and 16 (batch 1 at 128 already measured)
    m = ProfileSet.from_csv(write_profile(tmp_path / "p.csv", rows)).get("fake", "cpu", 1)
    for tokens in (16, 512, 4 * 128):
        assert m.prefill_time(tokens) == pytest.approx(1e-3 + 1e-5 * tokens)
    # decode at the reference context (128 + 9/2 tokens per request) over batch sizes
    for b in (1, 4, 16):
        expected = 2e-3 + 1e-4 * b + 1e-6 * b * (128 + 1 + 3.5)  # mean context over the 8 steps
        assert m.decode_step_time(b) == pytest.approx(expected, rel=0.02)
    assert m.context_slope == pytest.approx(1e-6, rel=0.05)  # fitted on the batch-1 prompt sweep
    assert calls[0] == (1, 16, 4)  # warm-up first


def test_prompts_are_distinct_so_prefix_caching_cannot_help():
    seen = []
    plan = ProfilePlan(prompt_sizes=[32], batch_sizes=[4], ref_prompt=32, decode_tokens=2, repeats=1)
    Profiler(lambda prompts, t: seen.extend(map(tuple, prompts)) or 0.0, plan, "m", "hw", log=lambda s: None).run()
    assert len(set(seen)) == len(seen)


def test_bad_plans_are_refused():
    with pytest.raises(SpecError):
        ProfilePlan(decode_tokens=1).check()
    with pytest.raises(SpecError):
        ProfilePlan(batch_sizes=[0]).check()
