"""Prefix-aware placement on synthetic snapshots, and through the controller with the approximate index."""

from __future__ import annotations

import pytest

from pdserve.router.controller import Router
from pdserve.router.policy import LeastLoaded
from pdserve.router.prefix_policy import PrefixAware
from pdserve.router.prefix_tracker import PrefixTracker
from pdserve.router.registry import make_policy, make_prefix_policy
from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot, Placement, RequestInfo
from pdserve.shared.config import PrefixRoutingConfig, ServeConfig
from pdserve.shared.roles import Role
from pdserve.worker.fake_engine import FakeEngineClient

REQ = RequestInfo("r", prompt_tokens=160, max_tokens=16)  # 10 blocks of 16


def inst(iid, role, prefix=0, **kw) -> InstanceSnapshot:
    return InstanceSnapshot(iid, role, kv_blocks_total=1000, kv_blocks_free=1000, prefix_blocks=prefix, **kw)


def decide(policy, *instances):
    return policy.decide(REQ, ClusterSnapshot(tuple(instances)))


def test_decode_prefers_the_longest_held_prefix_at_equal_load():
    got = decide(PrefixAware(), inst("p0", Role.PREFILL), inst("d0", Role.DECODE, prefix=2),
                 inst("d1", Role.DECODE, prefix=8), inst("d2", Role.DECODE))
    assert got.decode == "d1"


def test_decode_follows_the_prefix_only_while_its_load_allows():
    p = PrefixAware(PrefixRoutingConfig(balance_slack=4))
    base = (inst("p0", Role.PREFILL), inst("d1", Role.DECODE, outstanding=1))
    # A full hit (10 of 10 blocks; 159 of 160 tokens computable) carries d0 up to ~4 requests above d1.
    assert decide(p, *base, inst("d0", Role.DECODE, prefix=10, outstanding=4)).decode == "d0"
    assert decide(p, *base, inst("d0", Role.DECODE, prefix=10, outstanding=8)).decode == "d1"
    # Load weight 0: the prefix wins whatever the load; hit weight 0: load alone.
    heavy = inst("d0", Role.DECODE, prefix=10, outstanding=50)
    assert decide(PrefixAware(PrefixRoutingConfig(load_weight=0)), *base, heavy).decode == "d0"
    assert decide(PrefixAware(PrefixRoutingConfig(hit_weight=0)), *base, heavy).decode == "d1"


def test_prefill_minimizes_tokens_ahead_of_the_first_token():
    p = PrefixAware()
    ds = (inst("d0", Role.DECODE),)
    # p0 holds 128 tokens of the prompt but has 100 queued: 100 - 128 < 50 - 0.
    got = decide(p, inst("p0", Role.PREFILL, prefix=8, outstanding_prefill_tokens=100),
                 inst("p1", Role.PREFILL, outstanding_prefill_tokens=50), *ds)
    assert got.prefill == "p0"
    got = decide(p, inst("p0", Role.PREFILL, prefix=8, outstanding_prefill_tokens=200),
                 inst("p1", Role.PREFILL, outstanding_prefill_tokens=50), *ds)
    assert got.prefill == "p1"


def test_no_hit_anywhere_defers_to_the_base_policy():
    s = (inst("p0", Role.PREFILL, outstanding_prefill_tokens=10), inst("p1", Role.PREFILL),
         inst("d0", Role.DECODE, outstanding=3), inst("d1", Role.DECODE, outstanding=1))
    assert decide(PrefixAware(), *s) == decide(LeastLoaded(), *s) == Placement("r", prefill="p1", decode="d1")


def test_a_one_block_prompt_hit_never_claims_the_last_token():
    # vLLM always computes the prompt's last token: a 16-token prompt fully held saves 15.
    assert inst("d0", Role.DECODE, prefix=1).prefix_tokens(16) == 15
    assert inst("d0", Role.DECODE, prefix=5).prefix_tokens(16) == 15


def test_decode_without_room_is_not_chosen_for_its_prefix():
    full = InstanceSnapshot("d0", Role.DECODE, kv_blocks_total=100, kv_blocks_free=2, prefix_blocks=10)
    got = decide(PrefixAware(), inst("p0", Role.PREFILL), full, inst("d1", Role.DECODE))
    assert got.decode == "d1"


def test_registry_and_config_select_it():
    assert isinstance(make_policy("prefix_aware"), PrefixAware)
    cfg = ServeConfig.model_validate({"gateway": {"routing_policy": "prefix_aware"},
                                      "prefix_routing": {"load_weight": 2.0, "base_policy": "kv_jsq"}})
    policy = make_prefix_policy(cfg.prefix_routing)
    assert policy.config.load_weight == 2.0 and policy.base.name == "kv_jsq"
    assert cfg.publishes_kv_events
    with pytest.raises(ValueError):
        PrefixRoutingConfig(base_policy="prefix_aware")


def test_controller_sends_a_conversations_next_turn_where_its_history_is():
    """The approximate index (the router's own record): turn 2 resends turn 1's prompt plus more."""
    engines = [FakeEngineClient.make(f"p{i}", Role.PREFILL) for i in range(2)] + \
              [FakeEngineClient.make(f"d{i}", Role.DECODE) for i in range(2)]
    tracker = PrefixTracker(PrefixRoutingConfig(index="sent"))
    router = Router(engines, make_prefix_policy(tracker.config), prefix=tracker)
    history = list(range(1000, 1100))
    first = router.place(RequestInfo("a", len(history), 8), history)
    # Another conversation lands elsewhere while the first one's instances are busy.
    with router.track(first, len(history)):
        other = router.place(RequestInfo("b", 64, 8), list(range(5000, 5064)))
    assert (other.prefill.instance_id, other.decode.instance_id) != (first.prefill.instance_id,
                                                                     first.decode.instance_id)
    turn2 = history + list(range(2000, 2040))
    second = router.place(RequestInfo("c", len(turn2), 8), turn2)
    assert second.decode is first.decode and second.prefill is first.prefill
    held = 100 // 16 * 16
    assert tracker.hit_tokens["decode"] == held and tracker.hit_tokens["prefill"] == held
    # The instance restarts: its cache is gone, so is the preference.
    tracker.restarted(first.decode.info)
    assert tracker.lookup(tracker.keys(turn2, 16), [first.decode.instance_id], 0.0) == {first.decode.instance_id: 0}


def test_metrics_count_bytes_saved_from_running_totals_and_hits_per_role():
    from pdserve.shared.metrics import Metrics
    from pdserve.shared.protocol import EngineStats

    m = Metrics("demo")
    for totals in ({"bytes_sent": 100, "bytes_saved": 300, "blocks_saved": 3},
                   {"bytes_sent": 150, "bytes_saved": 300, "blocks_saved": 3},
                   {"bytes_sent": 200, "bytes_saved": 700, "blocks_saved": 7}):
        m.observe_instance(EngineStats("p0", Role.PREFILL, kv_transfer=totals))
    m.observe_prefix(Role.PREFILL, 160, 96)
    text = m.render().decode()
    assert 'pdserve:kv_transfer_bytes_saved_total{instance="p0",model_name="demo",role="prefill"} 700.0' in text
    assert 'pdserve:kv_transfer_blocks_saved_total{instance="p0",model_name="demo",role="prefill"} 7.0' in text
    assert 'pdserve:prefix_cache_hits_total{model_name="demo",role="prefill"} 96.0' in text
    assert 'pdserve:prefix_cache_queries_total{model_name="demo",role="prefill"} 160.0' in text


def test_an_instance_that_leaves_is_forgotten():
    engines = [FakeEngineClient.make(f"d{i}", Role.MIXED) for i in range(2)]
    tracker = PrefixTracker(PrefixRoutingConfig(index="sent"))
    router = Router(engines, make_prefix_policy(tracker.config), prefix=tracker)
    prompt = list(range(64))
    route = router.place(RequestInfo("a", 64, 4), prompt)
    keys = tracker.keys(prompt, 16)
    assert tracker.lookup(keys, [route.decode.instance_id], 0.0)[route.decode.instance_id] == 4
    router.unregister(route.decode.instance_id)
    assert tracker.lookup(keys, [route.decode.instance_id], 0.0)[route.decode.instance_id] == 0
