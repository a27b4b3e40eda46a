"""Starting and stopping the engine instances of every pool as Ray actors.

Lifecycle: start_pools() creates one actor per instance (role, index), calls
start() on all of them concurrently (engine start-up dominates: ~40 s on CPU)
and returns a connected `RayEngineClient` for each; stop_pools() shuts the
engines down (their engine-core processes exit) and kills the actors.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from pdserve.shared.config import EngineConfig, KVTransferConfig, PoolConfig, PoolsConfig, engine_for
from pdserve.shared.errors import EngineError
from pdserve.shared.roles import Role
from pdserve.worker.client import RayEngineClient
from pdserve.worker.engine import EngineWorker

logger = logging.getLogger(__name__)


@dataclass
class Pools:
    clients: list[RayEngineClient] = field(default_factory=list)

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


def start_pools(engine: EngineConfig, pools: PoolsConfig, namespace_prefix: str = "pdserve",
                kv: KVTransferConfig | None = None, cores: list[int] | None = None) -> Pools:
    """Create and start every instance; raises `EngineError` if any fails to start.

    Prefill and decode instances get pdserve's KV connector (`kv` is then
    required); mixed instances run plain vLLM.
    With `cores` (CPU engines on this machine), each instance binds its compute
    threads to its own slice of them (`core_bindings`).
    """
    import ray

    actor_cls = ray.remote(EngineWorker)
    generation = itertools.count(1)

    instances = _instances(pools)
    bindings = dict(zip((iid for iid, _ in instances),
                        core_bindings(len(instances), int(pools.cpus_per_instance), cores))) if cores else {}

    def make_actor(instance_id: str, role: Role) -> Any:
        if role is not Role.MIXED and kv is None:
            raise EngineError("prefill/decode instances need a KV transfer config")
        return actor_cls.options(
            # A respawned actor gets a new name: the dead one's may not be released yet.
            name=f"{namespace_prefix}-{instance_id}-{next(generation)}",
            **actor_options(pools, role),
            max_concurrency=1000,  # one long-lived outputs() stream plus control calls
            # The engine core inherits the actor's environment: vLLM-CPU binds its threads as told.
            runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": bindings[instance_id]}}
            if instance_id in bindings else None,
        ).remote(instance_id, role, engine_for(engine, pool_of(pools, role)), kv if role is not Role.MIXED else None)

    actors = [make_actor(instance_id, role) for instance_id, role in instances]
    try:
        infos = ray.get([a.start.remote() for a in actors])
    except Exception as exc:
        for actor in actors:
            ray.kill(actor)
        raise EngineError(f"engine start-up failed: {exc}") from exc
    return Pools([RayEngineClient(a, info, respawn=functools.partial(make_actor, iid, role))
                  for a, info, (iid, role) in zip(actors, infos, instances)])


def stop_pools(pools: Pools, timeout_s: float = 30.0) -> None:
    import ray

    refs = [a.shutdown.remote() for a in pools.actors]
    try:
        ray.get(refs, timeout=timeout_s)
    except Exception as exc:  # an engine that will not stop cleanly is killed below anyway
        logger.warning("engine shutdown: %s", exc)
    for actor in pools.actors:
        ray.kill(actor)
