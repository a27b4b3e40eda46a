"""The migration policy (router.migration_policy): each trigger, targets with room, limits, no I/O."""

from __future__ import annotations

from pdserve.router.migration_policy import (Migration, MigrationPolicyConfig, MigrationReason, MigrationSnapshot,
                                             RunningRequest, decide)
from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot
from pdserve.shared.roles import Role
from pdserve.shared.slo import Priority

TOTAL = 100  # blocks per instance (block size 16)


def _inst(iid: str, used: int, role: Role = Role.DECODE, healthy: bool = True) -> InstanceSnapshot:
    return InstanceSnapshot(iid, role, healthy=healthy, kv_blocks_total=TOTAL, kv_blocks_free=TOTAL - used)


def _snap(instances, running, **kwargs) -> MigrationSnapshot:
    return MigrationSnapshot(ClusterSnapshot(tuple(instances)), tuple(running), **kwargs)


def _req(rid: str, iid: str, blocks: int, **kwargs) -> RunningRequest:
    return RunningRequest(rid, iid, blocks * 16, **kwargs)


def test_balanced_cluster_moves_nothing() -> None:
    snap = _snap([_inst("d0", 30), _inst("d1", 20)], [_req("a", "d0", 30), _req("b", "d1", 20)])
    assert decide(snap) == []


def test_load_balance_moves_about_half_the_gap_to_the_least_used() -> None:
    running = [_req("big", "d0", 50), _req("half", "d0", 35), _req("small", "d0", 5)]
    snap = _snap([_inst("d0", 85), _inst("d1", 5), _inst("d2", 25)], running)
    # gap 0.8 -> 40 blocks from d0 to d1 evens them; "half" (35) is the closest to it
    assert decide(snap) == [Migration("half", "d0", "d1", MigrationReason.LOAD_BALANCE)]


def test_load_balance_on_predicted_tpot_spread() -> None:
    snap = _snap([_inst("d0", 40), _inst("d1", 30)], [_req("a", "d0", 20), _req("b", "d0", 20)],
                 tpot_s={"d0": 0.2, "d1": 0.05})
    out = decide(snap)  # the KV gap alone (0.1) would not move anything
    assert [(m.source, m.target, m.reason) for m in out] == [("d0", "d1", MigrationReason.LOAD_BALANCE)]
    assert decide(_snap(snap.cluster.instances, snap.running, tpot_s={"d0": 0.07, "d1": 0.05})) == []


def test_drain_moves_everything_off_largest_first_within_slots() -> None:
    running = [_req("a", "d0", 10), _req("b", "d0", 30), _req("c", "d0", 20)]
    snap = _snap([_inst("d0", 60), _inst("d1", 0), _inst("d2", 0)], running, draining=frozenset({"d0"}))
    out = decide(snap, MigrationPolicyConfig(max_per_instance=3))
    assert [m.request_id for m in out] == ["b", "c", "a"]
    assert all(m.reason is MigrationReason.DRAIN and m.target in ("d1", "d2") for m in out)
    # one slot per instance: one migration now, the rest on later calls
    assert len(decide(snap)) == 1


def test_drain_never_targets_a_draining_or_unhealthy_or_prefill_instance() -> None:
    running = [_req("a", "d0", 10)]
    instances = [_inst("d0", 10), _inst("d1", 0), _inst("d2", 0, healthy=False), _inst("p0", 0, Role.PREFILL)]
    snap = _snap(instances, running, draining=frozenset({"d0", "d1"}))
    assert decide(snap) == []


def test_a_target_needs_room_for_the_context_plus_headroom() -> None:
    snap = _snap([_inst("d0", 60), _inst("d1", 90)], [_req("a", "d0", 8)], draining=frozenset({"d0"}))
    assert decide(snap, MigrationPolicyConfig(headroom_blocks=4)) == []  # 8 + 4 > 10 free
    assert len(decide(snap, MigrationPolicyConfig(headroom_blocks=2))) == 1


def test_preemption_sheds_shortest_requests_until_below_the_mark() -> None:
    running = [_req("s1", "d0", 3), _req("s2", "d0", 4), _req("long", "d0", 85)]
    snap = _snap([_inst("d0", 96), _inst("d1", 10)], running)
    out = decide(snap, MigrationPolicyConfig(preempt_kv_usage=0.9, max_per_instance=5, kv_spread=1.0))
    assert [(m.request_id, m.reason) for m in out] == [("s1", MigrationReason.PREEMPTION),
                                                       ("s2", MigrationReason.PREEMPTION)]


def test_priority_moves_batch_requests_off_an_instance_missing_an_interactive_tpot() -> None:
    running = [_req("chat", "d0", 10, priority=Priority.INTERACTIVE, tpot_slo_s=0.05),
               _req("job", "d0", 10, priority=Priority.BATCH)]
    snap = _snap([_inst("d0", 20), _inst("d1", 20), _inst("d2", 20)], running,
                 tpot_s={"d0": 0.08, "d1": 0.09, "d2": 0.03})
    assert decide(snap) == [Migration("job", "d0", "d2", MigrationReason.PRIORITY)]  # d1 is no faster
    fine = _snap(snap.cluster.instances, running, tpot_s={"d0": 0.04, "d1": 0.09, "d2": 0.03})
    assert decide(fine) == []


def test_requests_in_flight_or_unmigratable_do_not_move_and_hold_their_slots() -> None:
    running = [_req("fresh", "d0", 40, migratable=False), _req("n2", "d0", 40, migratable=False)]
    snap = _snap([_inst("d0", 80), _inst("d1", 0)], running)
    assert decide(snap) == []  # neither can move (still prefilling, n > 1, ...)
    busy = _snap([_inst("d0", 80), _inst("d1", 0)], [_req("a", "d0", 40), _req("b", "d0", 40)],
                 in_flight=(("x", "d0", "d1"),))
    assert decide(busy) == []  # d0 and d1 already take part in one migration


def test_claimed_blocks_count_against_the_target_within_one_call() -> None:
    running = [_req(f"r{i}", "d0", 30) for i in range(3)]
    snap = _snap([_inst("d0", 90), _inst("d1", 0)], running, draining=frozenset({"d0"}))
    out = decide(snap, MigrationPolicyConfig(max_per_instance=5, headroom_blocks=4))
    assert len(out) == 3  # 3 x 30 + 4 headroom fits 100
    tight = decide(snap, MigrationPolicyConfig(max_per_instance=5, headroom_blocks=11))
    assert len(tight) == 2  # a third would leave fewer than 11 free


async def test_the_policy_loop_survives_a_failing_round_and_applies_the_next():
    import asyncio
    import types

    from pdserve.router.migration import run_policy

    applied: list[list[str]] = []
    rounds = iter([RuntimeError("snapshot broke"), ["move-1"]])

    class Migrator:
        policy_errors = 0

        def decide(self, draining):
            outcome = next(rounds, [])
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        async def apply(self, moves):
            applied.append(moves)

    router = types.SimpleNamespace(migrator=Migrator(), draining=set())
    loop = asyncio.create_task(run_policy(router, 0.01))
    for _ in range(200):
        if applied:
            break
        await asyncio.sleep(0.01)
    loop.cancel()
    assert applied == [["move-1"]] and router.migrator.policy_errors == 1
