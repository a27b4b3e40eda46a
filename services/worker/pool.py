"""Starting and stopping the engine instances of every pool as Ray actors.

Lifecycle: start_pools() creates one actor per instance (role, index), calls
start() on all of them concurrently (engine start-up dominates: ~40 s on CPU)
and returns a connected `RayEngineClient` for each, with the factory that
starts and stops more while serving (`pdserve scale`); stop_pools() shuts
every live engine down (their engine-core processes exit) and kills the
actors.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from pdserve.shared.config import EngineConfig, KVTransferConfig, PoolConfig, PoolsConfig, engine_for
from pdserve.shared.errors import EngineError
from pdserve.shared.protocol import EngineInfo
from pdserve.shared.roles import Role
from pdserve.worker.client import RayEngineClient
from pdserve.worker.engine import EngineWorker
from pdserve.worker.placement import CorePlan, assign, format_cores, plan_cores
from pdserve.worker.vllm_plugin import SPIN_ENV

logger = logging.getLogger(__name__)


@dataclass
class Pools:
    clients: list[RayEngineClient] = field(default_factory=list)  # the instances started with the server
    factory: RayInstanceFactory | None = None  # starts more while serving; knows every live one

    @property
    def actors(self) -> list:
        return [c.actor for c in self.clients]


def core_bindings(count: int, cores_each: int, available: list[int]) -> list[str]:
    """Disjoint core lists, one per instance in order (vLLM's VLLM_CPU_OMP_THREADS_BIND syntax).

    With fewer cores than instances need, the lists wrap around and instances share (logged).
    """
    try:
        return [format_cores(c) for c in assign([cores_each] * count, available)]
    except ValueError as exc:
        raise EngineError(str(exc)) from exc


def cores_each(pools: PoolsConfig, role: Role) -> int:
    """Cores an instance of `role` computes on: its pool's Ray CPUs, at least one."""
    return max(1, int(pools.cpus_for(pool_of(pools, role))))


def plan_for(pools: PoolsConfig, available: list[int]) -> CorePlan:
    """Every start-up instance's compute cores and the front end's, from the pools' CPUs per instance."""
    return plan_cores([(iid, cores_each(pools, role)) for iid, role in _instances(pools)], available)


def pool_of(pools: PoolsConfig, role: Role) -> PoolConfig:
    return {Role.MIXED: pools.mixed, Role.PREFILL: pools.prefill, Role.DECODE: pools.decode}[role]


def _instances(pools: PoolsConfig) -> list[tuple[str, Role]]:
    plan = [(role, pool_of(pools, role).instances) for role in (Role.MIXED, Role.PREFILL, Role.DECODE)]
    return [(f"{role.value}-{i}", role) for role, count in plan for i in range(count)]


def actor_options(pools: PoolsConfig, role: Role) -> dict[str, Any]:
    """What one instance of `role` reserves in Ray: its pool's CPUs, GPUs and custom resources."""
    pool = pool_of(pools, role)
    return {"num_cpus": pools.cpus_for(pool), "num_gpus": pools.gpus_for(pool),
            "resources": dict(pool.resources) or None}


class RayInstanceFactory:
    """Makes, starts and stops instances as Ray actors: at start-up and later, when scaling."""

    def __init__(self, engine: EngineConfig, pools: PoolsConfig, namespace_prefix: str = "pdserve",
                 kv: KVTransferConfig | None = None, cores: list[int] | None = None,
                 plan: CorePlan | None = None) -> None:
        import ray

        self.engine, self.pools, self.namespace_prefix, self.kv, self.cores = engine, pools, namespace_prefix, kv, cores
        # With `cores` (CPU engines on this machine): every instance computes on cores of its own.
        self.plan = plan if plan is not None else (plan_for(pools, cores) if cores else None)
        self._actor_cls = ray.remote(EngineWorker)
        self._generation = itertools.count(1)
        self._next_index = {role: pool_of(pools, role).instances for role in Role}
        self.live: dict[str, RayEngineClient] = {}  # every instance started and not stopped

    def _bind_new(self, instance_id: str, role: Role) -> None:
        """A scaled-up instance: cores no live instance computes on, the front end's only when none are left."""
        if self.plan is None or not self.cores or instance_id in self.plan.engines:
            return
        taken = {c for iid, cores in self.plan.engines.items() if iid in self.live for c in cores}
        spare = [c for c in self.cores if c not in self.plan.front] + list(self.plan.front)
        self.plan.engines[instance_id] = assign([cores_each(self.pools, role)], spare, taken)[0]

    def make_actor(self, instance_id: str, role: Role) -> Any:
        if role is not Role.MIXED and self.kv is None:
            raise EngineError("prefill/decode instances need a KV transfer config")
        self._bind_new(instance_id, role)
        env = self.plan.env(instance_id) if self.plan is not None else {}
        if self.pools.shm_spin_s is not None and self.plan is not None and not self.plan.front:
            # Every core computes: bound the engines' busy-wait (read by the vLLM plugin in their processes).
            # With a core left for the front end, vLLM's spin is cheaper than waking from a poll.
            env[SPIN_ENV] = str(self.pools.shm_spin_s)
        return self._actor_cls.options(
            # A respawned actor gets a new name: the dead one's may not be released yet.
            name=f"{self.namespace_prefix}-{instance_id}-{next(self._generation)}",
            **actor_options(self.pools, role),
            max_concurrency=1000,  # one long-lived outputs() stream plus control calls
            # The engine core inherits the actor's environment: vLLM-CPU binds its threads as told
            # (worker.placement moves the rest to the front end's cores).
            runtime_env={"env_vars": env} if env else None,
        ).remote(instance_id, role, engine_for(self.engine, pool_of(self.pools, role)),
                 self.kv if role is not Role.MIXED else None)

    def client(self, actor: Any, info: EngineInfo) -> RayEngineClient:
        client = RayEngineClient(actor, info, respawn=functools.partial(self.make_actor, info.instance_id, info.role))
        self.live[info.instance_id] = client
        return client

    def new_instance_id(self, role: Role) -> str:
        index = self._next_index[role]
        self._next_index[role] += 1
        return f"{role.value}-{index}"

    async def start(self, role: Role) -> RayEngineClient:
        """One more instance of `role`, started (its engine loaded); EngineError if it fails to start."""
        import ray

        instance_id = self.new_instance_id(role)
        actor = self.make_actor(instance_id, role)
        timeout_s = self.pools.start_timeout_s
        try:
            # Bounded: an actor whose resources no node has (yet) waits in Ray's queue forever.
            info = await asyncio.wait_for(actor.start.remote(), timeout_s)
        except asyncio.TimeoutError as exc:
            ray.kill(actor)  # also withdraws its resource demand from the autoscaler
            raise EngineError(f"instance {instance_id} was not placed and started within "
                              f"pools.start_timeout_s = {timeout_s:g} s") from exc
        except Exception as exc:
            ray.kill(actor)
            raise EngineError(f"instance {instance_id} failed to start: {exc}") from exc
        return self.client(actor, info)

    async def stop(self, client: RayEngineClient, timeout_s: float = 30.0) -> None:
        """Shut its engine down and end its actor (the caller drained it first)."""
        import ray

        self.live.pop(client.instance_id, None)
        await client.close()
        try:
            await asyncio.wait_for(client.actor.shutdown.remote(), timeout_s)
        except Exception as exc:  # noqa: BLE001 - an engine that will not stop cleanly is killed anyway
            logger.warning("shutdown of %s: %s", client.instance_id, exc)
        ray.kill(client.actor)


def start_pools(engine: EngineConfig, pools: PoolsConfig, namespace_prefix: str = "pdserve",
                kv: KVTransferConfig | None = None, cores: list[int] | None = None,
                plan: CorePlan | None = None) -> Pools:
    """Create and start every instance; raises `EngineError` if any fails to start.

    Prefill and decode instances get pdserve's KV connector (`kv` is then
    required); mixed instances run plain vLLM.
    With `cores` (CPU engines on this machine), each instance binds its compute
    threads to its own slice of them (`plan`, else `plan_for`).
    """
    import ray

    factory = RayInstanceFactory(engine, pools, namespace_prefix, kv, cores, plan)
    instances = _instances(pools)
    actors = [factory.make_actor(instance_id, role) for instance_id, role in instances]
    try:
        infos = ray.get([a.start.remote() for a in actors])
    except Exception as exc:
        for actor in actors:
            ray.kill(actor)
        raise EngineError(f"engine start-up failed: {exc}") from exc
    return Pools([factory.client(a, info) for a, info in zip(actors, infos)], factory)


def stop_pools(pools: Pools, timeout_s: float = 30.0) -> None:
    import ray

    actors = [c.actor for c in pools.factory.live.values()] if pools.factory else pools.actors
    refs = [a.shutdown.remote() for a in actors]
    try:
        ray.get(refs, timeout=timeout_s)
    except Exception as exc:  # an engine that will not stop cleanly is killed below anyway
        logger.warning("engine shutdown: %s", exc)
    for actor in actors:
        ray.kill(actor)
