"""Core plans for CPU instances (worker.placement) and the factory's bindings for scaled-up instances."""

from __future__ import annotations

import os
import threading

import pytest

from pdserve.shared.config import PoolsConfig
from pdserve.worker import placement
from pdserve.worker.placement import BIND_ENV, FRONT_ENV, assign, parse_cores, plan_cores


def test_parse_and_format_cores():
    assert parse_cores("0,2-4, 7") == {0, 2, 3, 4, 7}
    assert parse_cores("") == set() and parse_cores(None) == set()
    assert placement.format_cores({3, 1}) == "1,3"


def test_one_instance_on_two_cores_leaves_the_front_end_a_core():
    plan = plan_cores([("mixed-0", 1)], [0, 1])
    assert plan.engines == {"mixed-0": [0]} and plan.front == [1]
    assert plan.env("mixed-0") == {BIND_ENV: "0", FRONT_ENV: "1"}
    assert plan.env("unknown") == {}


def test_prefill_and_decode_never_share_a_core():
    plan = plan_cores([("prefill-0", 2), ("decode-0", 1)], [0, 1, 2, 3, 4])
    assert plan.engines == {"prefill-0": [0, 1], "decode-0": [2]}
    assert plan.front == [3, 4]
    plan = plan_cores([("prefill-0", 1), ("decode-0", 1)], [0, 1])
    assert plan.engines == {"prefill-0": [0], "decode-0": [1]} and plan.front == []
    assert plan.env("decode-0") == {BIND_ENV: "1"}  # no front-end cores: nothing else is moved


def test_assign_skips_taken_cores_and_wraps_only_when_out():
    assert assign([1], [0, 1, 2, 3], taken={0, 1}) == [[2]]
    assert assign([2, 2], [0, 1, 2], taken={0}) == [[1, 2], [0, 1]]  # out of cores: the taken one is shared last
    with pytest.raises(ValueError):
        assign([1], [])


def test_pool_plan_uses_each_pools_cpus():
    from pdserve.worker.pool import plan_for

    pools = PoolsConfig.model_validate({"prefill": {"instances": 1, "cpus_per_instance": 2},
                                        "decode": {"instances": 2}})
    plan = plan_for(pools, list(range(6)))
    assert plan.engines == {"prefill-0": [0, 1], "decode-0": [2], "decode-1": [3]}
    assert plan.front == [4, 5]


def test_scaled_up_instance_gets_free_cores_before_the_front_ends(monkeypatch):
    pytest.importorskip("ray")
    from pdserve.shared.config import EngineConfig
    from pdserve.shared.roles import Role
    from pdserve.worker.pool import RayInstanceFactory

    pools = PoolsConfig(mixed=1, prefill=0, decode=0)
    factory = RayInstanceFactory(EngineConfig(), pools, cores=[0, 1, 2, 3])
    assert factory.plan.engines == {"mixed-0": [0]} and factory.plan.front == [1, 2, 3]
    factory.live["mixed-0"] = object()  # started
    factory._bind_new("mixed-1", Role.MIXED)
    assert factory.plan.engines["mixed-1"] == [1]
    factory.live["mixed-1"] = object()
    factory.live.pop("mixed-0")  # stopped: its core is free again
    factory._bind_new("mixed-2", Role.MIXED)
    assert factory.plan.engines["mixed-2"] == [0]


def _in_thread(fn):
    """Run `fn` in a fresh thread (affinity changes stay in that thread) and answer its result."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn()))
    thread.start()
    thread.join()
    return out["r"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_spawn_affinity_widens_the_spawning_thread_then_restores(monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv(BIND_ENV, str(cores[0]))
    monkeypatch.setenv(FRONT_ENV, str(cores[1]))

    def run():
        os.sched_setaffinity(0, {cores[1]})  # as a worker pinned to the front end starts
        with placement.spawn_affinity():
            inside = os.sched_getaffinity(0)
        return inside, os.sched_getaffinity(0)

    inside, after = _in_thread(run)
    assert inside == {cores[0], cores[1]} and after == {cores[1]}


def test_no_front_end_cores_moves_nothing(monkeypatch):
    monkeypatch.setenv(BIND_ENV, "0")
    monkeypatch.delenv(FRONT_ENV, raising=False)
    assert placement.pin_to_front() == {}


def test_restore_priority_lowers_niceness_when_allowed():
    import subprocess
    import sys

    # In a child started at niceness 5: it comes back to 0 if this user may raise priority, else stays.
    code = "from pdserve.worker.placement import restore_priority; print(restore_priority())"
    out = subprocess.run(["nice", "-n", "5", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    can_raise = os.geteuid() == 0
    assert int(out) == (0 if can_raise else 5)


class _CapturingActor:
    """Stands in for the Ray actor class: records what an instance would be started with."""

    def __init__(self) -> None:
        self.options_seen: dict = {}

    def options(self, **kwargs):
        self.options_seen = kwargs
        return self

    def remote(self, *args):
        return args


@pytest.mark.parametrize("spin,cores,bounded", [(0.05, [0, 1], True), (None, [0, 1], False), (0.05, [0, 1, 2], False)])
def test_engines_bound_the_shm_spin_only_when_no_core_is_left_for_the_front_end(spin, cores, bounded):
    pytest.importorskip("ray")
    from pdserve.shared.config import EngineConfig
    from pdserve.shared.roles import Role
    from pdserve.worker.pool import RayInstanceFactory
    from pdserve.worker.vllm_plugin import SPIN_ENV

    pools = PoolsConfig(mixed=0, prefill=1, decode=1, shm_spin_s=spin)
    from pdserve.shared.config import KVTransferConfig

    factory = RayInstanceFactory(EngineConfig(), pools, cores=cores, kv=KVTransferConfig())
    factory._actor_cls = actor = _CapturingActor()
    factory.make_actor("decode-0", Role.DECODE)
    env = (actor.options_seen["runtime_env"] or {}).get("env_vars", {})
    assert env.get(BIND_ENV) == "1"
    assert env.get(SPIN_ENV) == ("0.05" if bounded else None)


def test_default_pools_bound_the_spin():
    assert PoolsConfig().shm_spin_s == 0.05
    with pytest.raises(ValueError):
        PoolsConfig(shm_spin_s=-1)
