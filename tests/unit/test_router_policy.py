"""Placement policies on hand-made snapshots: the base ones and Splitwise's mixed pool."""

from __future__ import annotations

import pytest

from pdserve.router.policy import LeastLoaded, RoundRobin, ShortestQueueKV
from pdserve.router.registry import UnknownPolicyError, make_policy
from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot, Placement, Rejection, RequestInfo
from pdserve.router.splitwise import SplitwiseMixedPool
from pdserve.shared.roles import Role

REQ = RequestInfo("r", prompt_tokens=100, max_tokens=60)  # 160 tokens = 10 blocks of 16


def snap(*instances: InstanceSnapshot) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(instances))


def inst(iid, role, total=100, free=100, **kw) -> InstanceSnapshot:
    return InstanceSnapshot(iid, role, kv_blocks_total=total, kv_blocks_free=free, **kw)


def test_round_robin_cycles_in_id_order():
    p = RoundRobin()
    s = snap(inst("m1", Role.MIXED), inst("m0", Role.MIXED))
    assert [p.decide(REQ, s).decode for _ in range(3)] == ["m0", "m1", "m0"]


def test_least_loaded_and_kv_jsq_look_at_different_load():
    s = snap(inst("m0", Role.MIXED, free=10, outstanding=1), inst("m1", Role.MIXED, free=90, outstanding=5))
    assert LeastLoaded().decide(REQ, s).decode == "m0"  # fewer requests
    assert ShortestQueueKV().decide(REQ, s).decode == "m1"  # more free KV


def test_disaggregated_placement_picks_decode_by_kv_and_prefill_by_queued_tokens():
    s = snap(inst("p0", Role.PREFILL, outstanding_prefill_tokens=500), inst("p1", Role.PREFILL),
             inst("d0", Role.DECODE, free=20), inst("d1", Role.DECODE, free=80))
    for policy in (ShortestQueueKV(), SplitwiseMixedPool()):
        assert policy.decide(REQ, s) == Placement("r", prefill="p1", decode="d1")


def test_too_big_for_any_instance_is_not_retryable():
    big = RequestInfo("r", prompt_tokens=5000, max_tokens=100)
    for policy in (ShortestQueueKV(), SplitwiseMixedPool()):
        d = policy.decide(big, snap(inst("p0", Role.PREFILL), inst("d0", Role.DECODE)))
        assert isinstance(d, Rejection) and not d.retryable and "more than any instance" in d.reason


def test_no_healthy_instance_is_rejected():
    d = LeastLoaded().decide(REQ, snap(InstanceSnapshot("m0", Role.MIXED, healthy=False)))
    assert isinstance(d, Rejection) and "no healthy instance" in d.reason


@pytest.mark.parametrize("down", [Role.PREFILL, Role.DECODE])
def test_a_pool_that_is_down_costs_latency_not_requests(down):
    """With every P (or every D) dead, the other pool's instances run requests whole."""
    instances = [inst("p0", Role.PREFILL), inst("d0", Role.DECODE)]
    s = snap(*(InstanceSnapshot(i.instance_id, i.role, healthy=False) if i.role is down else i for i in instances))
    alive = "d0" if down is Role.PREFILL else "p0"
    for policy in (LeastLoaded(), RoundRobin(), ShortestQueueKV()):
        assert policy.decide(REQ, s) == Placement("r", prefill=alive, decode=alive)


def test_unknown_policy_name():
    with pytest.raises(UnknownPolicyError):
        make_policy("magic")
    assert isinstance(make_policy("splitwise"), SplitwiseMixedPool)
    assert isinstance(make_policy("kv_jsq"), ShortestQueueKV)


def test_splitwise_long_prompt_queue_overflows_onto_a_token_machine():
    p = SplitwiseMixedPool(max_pending_prefill_tokens=1000)
    s = snap(inst("p0", Role.PREFILL, outstanding_prefill_tokens=950),
             inst("d0", Role.DECODE, free=50), inst("d1", Role.DECODE, free=90, outstanding_prefill_tokens=0))
    # 950 + 100 > 1000: the prompt runs on the emptiest-queue token machine
    assert p.decide(REQ, s) == Placement("r", prefill="d0", decode="d1")


def test_splitwise_full_token_pool_borrows_a_prompt_machine_for_tokens():
    s = snap(inst("p0", Role.PREFILL, free=100), inst("p1", Role.PREFILL, free=50),
             inst("d0", Role.DECODE, free=5))  # 5 blocks < 10 needed
    assert SplitwiseMixedPool().decide(REQ, s) == Placement("r", prefill="p0", decode="p0")


def test_splitwise_queues_on_a_token_machine_when_no_one_has_room():
    s = snap(inst("p0", Role.PREFILL, free=0), inst("d0", Role.DECODE, free=5), inst("d1", Role.DECODE, free=2))
    assert SplitwiseMixedPool().decide(REQ, s).decode == "d0"


def test_splitwise_falls_back_to_mixed_batching_when_both_pools_are_loaded():
    p = SplitwiseMixedPool(max_pending_prefill_tokens=1000)
    s = snap(inst("p0", Role.PREFILL, outstanding_prefill_tokens=990),
             inst("d0", Role.DECODE, free=80, outstanding_prefill_tokens=950),
             inst("d1", Role.DECODE, free=90, outstanding_prefill_tokens=980))
    # neither pool has a short queue: colocate on the least-queued instance with room
    assert p.decide(REQ, s) == Placement("r", prefill="d0", decode="d0")


def test_splitwise_on_a_colocated_cluster_behaves_like_the_base_policy():
    s = snap(inst("m0", Role.MIXED, free=30), inst("m1", Role.MIXED, free=60))
    assert SplitwiseMixedPool().decide(REQ, s) == Placement("r", prefill="m1", decode="m1")
