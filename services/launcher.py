"""Bringing a whole deployment up and down from one process (`pdserve serve`).

Lifecycle: Ray (local or joined) -> engine pools started -> tokenizer and
router -> gateway serving -> signal -> gateway drained -> engines shut down
-> actors killed -> Ray shut down (a local Ray's processes end with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from pdserve.shared.config import EngineConfig, ServeConfig
from pdserve.shared.errors import ConfigError

logger = logging.getLogger(__name__)


def _interrupt(signum, frame):  # SIGTERM: unwind through serve()'s cleanup
    raise KeyboardInterrupt


def _init_ray(config: ServeConfig) -> None:
    import ray

    if config.ray.address is None:
        # A local cluster we own: no auth tokens (nothing outside this machine can reach it).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts workers at niceness 15: an engine would lose its core to the gateway, Ray's own
        # daemons or any other process there, and serve slower than vLLM's own server.
        os.environ.setdefault("RAY_worker_niceness", "0")
        needed, custom = _local_needs(config)
        num_cpus = config.ray.num_cpus or max(os.cpu_count() or 1, int(needed + 0.999))
        # The pools' custom resources exist on a local cluster by fiat: a Splitwise YAML made for a
        # cluster of two GPU types runs here too, every pool on this one node.
        ray.init(namespace=config.ray.namespace, num_cpus=num_cpus, resources=custom or None,
                 include_dashboard=False)
    else:
        ray.init(address=config.ray.address, namespace=config.ray.namespace)


def _local_needs(config: ServeConfig) -> tuple[float, dict[str, float]]:
    """CPUs and custom resources all instances reserve together."""
    pools = config.pools
    cpus, custom = 0.0, {}
    for pool in (pools.mixed, pools.prefill, pools.decode):
        cpus += pool.instances * pools.cpus_for(pool)
        for name, amount in pool.resources.items():
            custom[name] = custom.get(name, 0.0) + amount * pool.instances
    return cpus, custom


def check_pools_agree(infos: list) -> None:
    """Engines of every pool must agree on what a KV block is; ConfigError naming the two that differ."""
    first = infos[0]
    for info in infos[1:]:
        for field in ("model", "block_size", "max_model_len"):
            if getattr(info, field) != getattr(first, field):
                raise ConfigError(f"{field} differs between pools: {getattr(first, field)} on {first.instance_id}, "
                                  f"{getattr(info, field)} on {info.instance_id}; set it under `engine` so every "
                                  "pool runs the same")


def _cores_to_bind(config: ServeConfig) -> list[int] | None:
    """This machine's cores, when CPU instances should each bind their own (a local Ray on a CPU platform)."""
    from vllm.platforms import current_platform

    pools = config.pools
    if not pools.bind_cores or config.ray.address is not None or \
            any(pools.gpus_for(p) for p in (pools.mixed, pools.prefill, pools.decode)):
        return None
    if not current_platform.is_cpu():
        return None
    return sorted(os.sched_getaffinity(0))


def _reap(processes: list, grace_s: float = 10.0) -> None:
    """End processes that outlived shutdown (Ray's per-node agents linger after their raylet)."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _engine_for_routing(config: ServeConfig) -> EngineConfig:
    """The engine settings with what the routing policy needs of every engine (KV events, their hash)."""
    if config.gateway.routing_policy != "prefix_aware":
        return config.engine
    # The router hashes prompts with this algorithm: the engines' prefix caches must too.
    args = {**config.engine.engine_args, "prefix_caching_hash_algo": config.prefix_routing.hash_algo}
    return config.engine.model_copy(update={"publish_kv_events": config.publishes_kv_events, "engine_args": args})


def _prefix_tracker(config: ServeConfig):
    if config.gateway.routing_policy != "prefix_aware":
        return None
    from pdserve.router.prefix_tracker import PrefixTracker

    return PrefixTracker(config.prefix_routing)


def _policy(config: ServeConfig):
    from pdserve.router.registry import make_policy, make_prefix_policy

    if config.gateway.routing_policy == "prefix_aware":
        return make_prefix_policy(config.prefix_routing)
    if config.gateway.routing_policy == "slo_aware":
        from pdserve.router.slo_policy import SloAware

        return SloAware(config.slo)
    return make_policy(config.gateway.routing_policy)


def serve(config: ServeConfig) -> int:
    import ray

    from pdserve.gateway.app import GatewayState, create_app
    from pdserve.gateway.model import ServedModel
    from pdserve.gateway.server import GatewayServer
    from pdserve.kv_transfer.ports import node_address, resolve_hosts
    from pdserve.kv_transfer.reservations import ReservationInbox
    from pdserve.router.admission import AdmissionQueue
    from pdserve.router.controller import Router
    from pdserve.router.scaling import Scaler
    from pdserve.shared.metrics import Metrics
    from pdserve.worker.placement import pin_launcher
    from pdserve.worker.pool import plan_for, start_pools, stop_pools

    previous = signal.signal(signal.SIGTERM, _interrupt)
    pools = None
    stack = contextlib.ExitStack()
    try:
        cores = _cores_to_bind(config)
        plan = plan_for(config.pools, cores) if cores else None
        pin_launcher(plan)  # before Ray starts: its daemons and workers inherit the front end's cores
        _init_ray(config)
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init() installs its own handler
        logger.info("starting %d engine instance(s) of %s", config.pools.total, config.engine.model)
        inbox = None
        if config.pools.prefill.instances:
            kv = resolve_hosts(config.kv_transfer, node_address())
            inbox = ReservationInbox(kv.bind_host or "127.0.0.1", kv.advertise_host, kv.port_range)
            inbox.start()
            stack.callback(inbox.close)
        prefix = _prefix_tracker(config)
        pools = start_pools(_engine_for_routing(config), config.pools, namespace_prefix=config.ray.namespace,
                            kv=config.kv_transfer, cores=cores, plan=plan)
        check_pools_agree([c.info for c in pools.clients])
        info = pools.clients[0].info
        model = ServedModel.load(config.engine.model_name, config.engine.tokenizer or config.engine.model,
                                 info.max_model_len, info.max_logprobs)
        metrics = Metrics(model.name)
        router = Router(pools.clients, _policy(config), on_stats=metrics.observe_instance,
                        on_restart=metrics.observe_restart, prefix=prefix,
                        inbox=inbox, admission=AdmissionQueue(config.slo),
                        reservation_timeout_s=config.kv_transfer.reservation_timeout_s,
                        transfer_timeout_s=config.kv_transfer.transfer_timeout_s)
        router.recovery.config = config.resume
        migration_interval_s = None
        if config.migration.enabled:
            from pdserve.router.migration import attach

            attach(router, config.migration, on_result=metrics.observe_migration)
            migration_interval_s = config.migration.interval_s
        api_key = config.gateway.api_key.get_secret_value() if config.gateway.api_key else None
        scaler = Scaler(router, pools.factory, disaggregated=inbox is not None,
                        drain_timeout_s=config.pools.drain_timeout_s)
        state = GatewayState(model, router, metrics, api_key=api_key,
                             stats_interval_s=config.gateway.stats_interval_s, scaler=scaler, slo=config.slo,
                             migration_interval_s=migration_interval_s)
        server = GatewayServer(create_app(state), config.gateway.host, config.gateway.port,
                               config.gateway.log_level)
        # uvicorn handles SIGINT/SIGTERM while serving, then re-raises the signal
        # it caught: our handler turns that into KeyboardInterrupt, so the
        # cleanup below runs instead of the default action (death).
        logger.info("gateway on http://%s:%d serving %r", config.gateway.host, config.gateway.port, model.name)
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        import psutil

        # Everything a local Ray started descends from this process; joined
        # clusters' processes are not ours to end.
        ours = psutil.Process().children(recursive=True) if config.ray.address is None else []
        if pools is not None:
            stop_pools(pools)
        if ray.is_initialized():
            ray.shutdown()
        _reap(ours)
        stack.close()
        signal.signal(signal.SIGTERM, previous)
        logger.info("stopped")
    return 0
