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
    if not available:
        raise EngineError("no CPU cores to bind instances to")
    cores_each = max(1, min(cores_each, len(available)))
    if count * cores_each > len(available):
        logger.warning("%d instance(s) x %d core(s) exceed the %d core(s) here: some instances share cores",
                       count, cores_each, len(available))
    out = []
    for i in range(count):
        cores = [available[(i * cores_each + k) % len(available)] for k in range(cores_each)]
        out.append(",".join(str(c) for c in sorted(set(cores))))
    return out


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
                 kv: KVTransferConfig | None = None, cores: list[int] | None = None) -> None:
        import ray

        self.engine, self.pools, self.namespace_prefix, self.kv, self.cores = engine, pools, namespace_prefix, kv, cores
        self._actor_cls = ray.remote(EngineWorker)
        self._generation = itertools.count(1)
        self._next_index = {role: pool_of(pools, role).instances for role in Role}
        self._bindings: dict[str, str] = {}
        self.live: dict[str, RayEngineClient] = {}  # every instance started and not stopped

    def bind_cores(self, instance_ids: list[str]) -> None:
        if self.cores:
            self._bindings.update(zip(instance_ids, core_bindings(len(instance_ids),
                                                                  int(self.pools.cpus_per_instance), self.cores)))

    def make_actor(self, instance_id: str, role: Role) -> Any:
        if role is not Role.MIXED and self.kv is None:
            raise EngineError("prefill/decode instances need a KV transfer config")
        binding = self._bindings.get(instance_id)
        return self._actor_cls.options(
            # A respawned actor gets a new name: the dead one's may not be released yet.
            name=f"{self.namespace_prefix}-{instance_id}-{next(self._generation)}",
            **actor_options(self.pools, role),
            max_concurrency=1000,  # one long-lived outputs() stream plus control calls
            # The engine core inherits the actor's environment: vLLM-CPU binds its threads as told.
            runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": binding}} if binding else None,
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
                kv: KVTransferConfig | None = None, cores: list[int] | None = None) -> Pools:
    """Create and start every instance; raises `EngineError` if any fails to start.

    Prefill and decode instances get pdserve's KV connector (`kv` is then
    required); mixed instances run plain vLLM.
    With `cores` (CPU engines on this machine), each instance binds its compute
    threads to its own slice of them (`core_bindings`).
    """
    import ray

    factory = RayInstanceFactory(engine, pools, namespace_prefix, kv, cores)
    instances = _instances(pools)
    factory.bind_cores([iid for iid, _ in instances])
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
