"""The cluster simulator against timelines computed by hand, and its conservation laws."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import InstanceSpec, LinkConfig, SimConfig, Simulator
from pdserve.planner.trace import Trace
from pdserve.router.policy import LeastLoaded
from pdserve.router.registry import make_policy
from pdserve.router.snapshot import Rejection
from pdserve.router.splitwise import SplitwiseMixedPool
from pdserve.shared.roles import Role

CONST = PerfModel.constant(prefill_s=1.0, step_s=0.1)
NO_TRANSFER = LinkConfig(bandwidth_gbps=1e12, latency_s=0.0, overlap=0.0)


def trace(arrival, prompt, output) -> Trace:
    return Trace("t", np.asarray(arrival, float), np.asarray(prompt), np.asarray(output))


def inst(name, role, perf=CONST, kv_tokens=100_000):
    return InstanceSpec(name, role, "x", perf, kv_tokens)


def run(instances, tr, policy="round_robin", **cfg):
    cfg.setdefault("link", NO_TRANSFER)
    sim = Simulator(instances, make_policy(policy) if isinstance(policy, str) else policy, SimConfig(**cfg))
    return sim, sim.run(tr)


def test_disaggregated_timeline_with_handoff_latency():
    # r0: prefill 0-1, KV at 1.5, 10 decode steps of 0.1 -> 2.5
    # r1: queued behind r0, prefill 1-2, KV at 2.5, 5 steps -> 3.0
    # r2: one output token: done when its prefill ends (3-4), no handoff
    _, res = run([inst("p0", Role.PREFILL), inst("d0", Role.DECODE)],
                 trace([0.0, 0.2, 3.0], [10, 10, 10], [11, 6, 1]),
                 link=LinkConfig(bandwidth_gbps=1e12, latency_s=0.5, overlap=0.0))
    np.testing.assert_allclose(res.first_token, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(res.finish, [2.5, 3.0, 4.0])
    np.testing.assert_allclose(res.handoff, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(res.ttft, [1.0, 1.8, 1.0])
    np.testing.assert_allclose(res.tpot[:2], [0.15, 0.2])
    assert res.reject_reason == [None, None, None]
    assert not res.colocated.any()


def test_colocated_mixed_batching_stalls_decode_for_a_prefill():
    # r0 prefills 0-1; r1 (arrived 0.15) prefills 1-2 with r0 riding along (one
    # decode step for r0); then both decode together: r0 needs 2 more steps,
    # r1 needs 2 -> both finish at 2.2.
    _, res = run([inst("m0", Role.MIXED)], trace([0.0, 0.15], [10, 10], [4, 3]))
    np.testing.assert_allclose(res.first_token, [1.0, 2.0])
    np.testing.assert_allclose(res.finish, [2.2, 2.2])
    assert res.colocated.all()


def test_kv_arrival_joins_at_the_next_step_boundary():
    # step 0.3; r0 decodes from 1.25 (10 steps -> 4.25). r1's KV lands at 2.25,
    # mid-step: it joins at 1.25 + 4 x 0.3 = 2.45, needs 2 steps -> 3.05.
    # A constant step time leaves r0's finish where it was.
    perf = PerfModel.constant(1.0, 0.3)
    _, res = run([inst("p0", Role.PREFILL, perf), inst("d0", Role.DECODE, perf)],
                 trace([0.0, 0.05], [10, 10], [11, 3]),
                 link=LinkConfig(bandwidth_gbps=1e12, latency_s=0.25, overlap=0.0))
    np.testing.assert_allclose(res.finish, [4.25, 3.05])


def test_waits_for_kv_room_then_runs():
    # Each request reserves ceil(20/16) = 2 blocks; the instance has 2. r1 is
    # placed when r0 finishes at 1.9: prefill 1.9-2.9, 9 steps -> 3.8.
    _, res = run([inst("m0", Role.MIXED, kv_tokens=32)], trace([0.0, 0.1], [10, 10], [10, 10]))
    np.testing.assert_allclose(res.first_token, [1.0, 2.9])
    np.testing.assert_allclose(res.finish, [1.9, 3.8])


class RefuseWhenFull(LeastLoaded):
    """A policy that refuses (retryably) when no instance has KV room, instead of queueing."""

    name = "refuse_when_full"

    def decide(self, request, snapshot):
        need = request.prompt_tokens + request.max_tokens
        if all(i.blocks_for(need) > i.kv_blocks_free for i in snapshot.instances):
            if any(i.blocks_for(need) <= i.kv_blocks_total for i in snapshot.instances):
                return Rejection(request.request_id, "no instance has KV room for the request now")
        return super().decide(request, snapshot)


def test_base_policy_queues_at_the_engine_when_kv_is_short():
    # the base policy places r1 although KV is full; the engine holds it until
    # r0 frees its blocks (same timeline as waiting in the router)
    _, res = run([inst("m0", Role.MIXED, kv_tokens=32)], trace([0.0, 0.1], [10, 10], [10, 10]),
                 admission_timeout_s=0.0)
    np.testing.assert_allclose(res.finish, [1.9, 3.8])
    assert res.num_rejected == 0


def test_router_admission_queue_waits_for_kv_room():
    _, res = run([inst("m0", Role.MIXED, kv_tokens=32)], trace([0.0, 0.1], [10, 10], [10, 10]),
                 policy=RefuseWhenFull())
    np.testing.assert_allclose(res.finish, [1.9, 3.8])


def test_rejections_carry_the_policys_reason():
    # r1 cannot wait (timeout 0); r2 can never fit (48 tokens > 32).
    _, res = run([inst("m0", Role.MIXED, kv_tokens=32)], trace([0.0, 0.1, 0.2], [10, 10, 40], [10, 10, 8]),
                 policy=RefuseWhenFull(), admission_timeout_s=0.0)
    assert res.reject_reason[0] is None
    assert "KV room" in res.reject_reason[1]
    assert "more than any instance holds" in res.reject_reason[2]
    assert np.isnan(res.finish[1:]).all()
    assert res.num_rejected == 2


def test_admission_timeout_rejects_a_request_that_waited_too_long():
    _, res = run([inst("m0", Role.MIXED, kv_tokens=32)], trace([0.0, 0.1], [10, 10], [10, 10]),
                 policy=RefuseWhenFull(), admission_timeout_s=1.0)  # r0 frees its KV at 1.9: r1 waited 1.8 s
    assert res.reject_reason[0] is None
    assert "admission timeout" in res.reject_reason[1]


def test_decode_batch_limit_queues_joins():
    # max batch 1: r1's KV is ready at 2.0 but r0 decodes until 2.0 + ... r0
    # decodes 1.0-2.0 (10 steps); r1 (prefilled 1-2) joins at 2.0 -> 2.5.
    _, res = run([inst("p0", Role.PREFILL), inst("d0", Role.DECODE)],
                 trace([0.0, 0.0], [10, 10], [11, 6]), max_batch_size=1)
    np.testing.assert_allclose(res.finish, [2.0, 2.5])


def test_prefill_batches_up_to_the_token_limit():
    # Three 600-token prompts at t=0: the first starts alone on the idle
    # engine; the other two share the next batch (1200 <= 2048 tokens) ...
    _, res = run([inst("p0", Role.PREFILL), inst("d0", Role.DECODE)],
                 trace([0, 0, 0], [600, 600, 600], [2, 2, 2]))
    np.testing.assert_allclose(res.first_token, [1.0, 2.0, 2.0])
    # ... unless the batch limit is below two prompts
    _, res = run([inst("p0", Role.PREFILL), inst("d0", Role.DECODE)],
                 trace([0, 0, 0], [600, 600, 600], [2, 2, 2]), max_prefill_tokens=1000)
    np.testing.assert_allclose(res.first_token, [1.0, 2.0, 3.0])


def test_handoff_overlaps_with_the_prefill():
    link = LinkConfig(bandwidth_gbps=1.0, latency_s=0.01, overlap=0.9)
    assert link.handoff_time(2e9, prefill_duration=0.5) == pytest.approx(0.01 + 1.5)  # longer than the prefill
    assert link.handoff_time(2e9, prefill_duration=5.0) == pytest.approx(0.01 + 0.2)  # 10% never hidden


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "kv_jsq", "splitwise", "refuse_when_full"])
@pytest.mark.parametrize("design", ["colocated", "split"])
def test_every_request_finishes_or_is_rejected_with_a_reason(policy, design):
    rng = np.random.default_rng(7)
    n = 400
    # some prompts exceed any instance's KV (600 tokens): rejected for good
    tr = trace(np.cumsum(rng.exponential(0.02, n)), rng.integers(1, 700, n), rng.integers(1, 60, n))
    perf = PerfModel.constant(0.05, 0.01)
    if design == "colocated":
        instances = [inst(f"m{i}", Role.MIXED, perf, kv_tokens=600) for i in range(3)]
    else:
        instances = [inst("p0", Role.PREFILL, perf, 600), inst("p1", Role.PREFILL, perf, 600),
                     inst("d0", Role.DECODE, perf, 600), inst("d1", Role.DECODE, perf, 600)]
    pol = {"splitwise": SplitwiseMixedPool, "refuse_when_full": RefuseWhenFull}.get(policy, lambda: make_policy(policy))()
    sim, res = run(instances, tr, policy=pol, admission_timeout_s=0.5)
    finished = res.finished
    rejected = np.array([r is not None for r in res.reject_reason])
    assert (finished ^ rejected).all()  # exactly one of the two
    assert rejected.any() and finished.any()  # the setup exercises both
    assert all(isinstance(r, str) and r for r in np.array(res.reject_reason, dtype=object)[rejected])
    assert (res.first_token[finished] >= res.arrival[finished]).all()
    assert (res.finish[finished] >= res.first_token[finished]).all()
    for i in sim.inst:  # everything given back
        assert i.kv_free == i.kv_blocks_total and not i.kv_wait and i.outstanding == 0 and i.pending_prefill_tokens == 0
        assert not i.finish_heap and not i.joins and not i.prefill_queue


def test_runs_are_deterministic():
    rng = np.random.default_rng(3)
    tr = trace(np.cumsum(rng.exponential(0.05, 200)), rng.integers(1, 300, 200), rng.integers(1, 40, 200))
    a = run([inst("m0", Role.MIXED), inst("m1", Role.MIXED)], tr, policy="kv_jsq")[1]
    b = run([inst("m0", Role.MIXED), inst("m1", Role.MIXED)], tr, policy="kv_jsq")[1]
    np.testing.assert_array_equal(a.finish, b.finish)
