"""An engine instance: one vLLM `AsyncLLM` inside a Ray actor.

Lifecycle of a request inside a worker:
  submit() -> vLLM queues it -> scheduled -> tokens (deltas) -> finished | aborted
Lifecycle of the worker: __init__ (cheap) -> start() (loads the model, ~40 s on
CPU) -> serves -> shutdown() (stops vLLM's engine-core process). If the engine
core dies, `stats()` says DEAD (every request on it has failed already, with
`error_kind="dead"`) and the controller calls restart(): a new engine in the
same actor, on the same output stream.

Outputs of all requests leave the worker in batches (everything that arrived
since the previous batch: one per engine step, across requests) over a direct
socket to the gateway, `output_channel()` (`worker.channel`), or Ray's
streaming call `outputs()` where that cannot be opened. A Ray item per token
per request costs more than a decode step at GPU rates, and even one per step
costs a millisecond of CPU on each side: hence the batches and the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any, AsyncIterator

from pdserve.shared.config import EngineConfig, KVTransferConfig
from pdserve.shared.errors import ConfigError
from pdserve.shared.protocol import EngineInfo, EngineRequest, EngineStats, OutputDelta, TokenLogprob
from pdserve.shared.roles import InstanceState, Role
from pdserve.worker.orphans import OrphanWatch
from pdserve.worker.vllm_plugin import LOAD_PROBE

logger = logging.getLogger(__name__)

# On CPU, vLLM treats this fraction as "of host memory"; its GPU default (0.9) fails there.
CPU_MEMORY_FRACTION = 0.15
# Set to 1 to let tests call the fault hooks (kill_engine_core); off in production.
FAULTS_ENV = "PDSERVE_FAULT_HOOKS"


def _error_kind(exc: BaseException) -> str | None:
    """"dead" if the engine core is gone, "invalid" if the engine refused the input, else None."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return "dead"
    if isinstance(exc, (VLLMClientError, ValueError)):
        return "invalid"
    return None


def connector_config(instance_id: str, kv: KVTransferConfig) -> dict[str, Any]:
    """vLLM `kv_transfer_config` plugging pdserve's P/D connector into an engine; `kv` handed over whole."""
    from pdserve.kv_transfer.connector import EXTRA_KEY

    return {
        "kv_connector": "PDConnector",
        "kv_connector_module_path": "pdserve.kv_transfer.connector",
        "kv_role": "kv_both",
        "engine_id": instance_id,
        "kv_load_failure_policy": "recompute",  # a failed handoff recomputes on decode
        "kv_connector_extra_config": {EXTRA_KEY: kv.model_dump(mode="json"), "instance_id": instance_id},
    }


def build_engine_args(config: EngineConfig, kv_transfer_config: dict[str, Any] | None = None,
                      kv_events_config: dict[str, Any] | None = None) -> Any:
    """`AsyncEngineArgs` from our config; unknown pass-through names are refused."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(config.engine_args) - known)
    if unknown:
        raise ConfigError(f"unknown vLLM engine arguments: {unknown}")
    kwargs: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.tokenizer,
        "served_model_name": config.model_name,
        "dtype": config.dtype,
        "seed": config.seed,
        "enforce_eager": config.enforce_eager,
        "tensor_parallel_size": config.tensor_parallel_size,
        "disable_log_stats": False,  # our stat logger needs the scheduler's stats
    }
    optional = {
        "max_model_len": config.max_model_len,
        "block_size": config.block_size,
        "kv_cache_memory_bytes": config.kv_cache_memory_bytes,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "enable_prefix_caching": config.enable_prefix_caching,
        "gpu_memory_utilization": config.gpu_memory_utilization
        or (CPU_MEMORY_FRACTION if current_platform.is_cpu() else None),
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if kv_transfer_config is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config
    if kv_events_config is not None:  # the router's prefix index follows these (worker.kv_events)
        from vllm.config.kv_events import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(**kv_events_config)
    kwargs.update(config.engine_args)
    # Every instance can continue a request from a token another one sampled
    # (P -> D handoffs, restarts from P's token): see kv_transfer.first_token.
    from pdserve.kv_transfer.first_token import PROCESSOR_FQCN

    processors = list(kwargs.get("logits_processors") or [])
    if PROCESSOR_FQCN not in processors:
        kwargs["logits_processors"] = [*processors, PROCESSOR_FQCN]
    return AsyncEngineArgs(**kwargs)


class _SchedulerStatsHolder:
    """Latest scheduler stats, written by vLLM's stat-logger hook."""

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.kv_transfer: dict[str, float] = {}  # the KV connector's counters, summed since start


def _stat_logger_factory(holder: _SchedulerStatsHolder):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.holder = holder

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                self.holder.num_running = scheduler_stats.num_running_reqs
                self.holder.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                self.holder.kv_usage = scheduler_stats.kv_cache_usage
                # The connector reports per-interval counts; keep running totals.
                for key, value in (scheduler_stats.kv_connector_stats or {}).items():
                    if isinstance(value, (int, float)):
                        self.holder.kv_transfer[key] = self.holder.kv_transfer.get(key, 0) + value

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


def _logprobs(choice: Any, start: int) -> list[TokenLogprob] | None:
    """Our logprob records for the tokens of `choice` from position `start` of its logprobs."""
    if choice.logprobs is None:
        return None
    out: list[TokenLogprob] = []
    for token_id, position in zip(choice.token_ids, list(choice.logprobs)[start:]):
        sampled = position[token_id]
        top = sorted(position.items(), key=lambda kv: kv[1].rank or 0)
        out.append(TokenLogprob(
            token_id=token_id,
            token=sampled.decoded_token or "",
            logprob=max(sampled.logprob, -9999.0),
            top=[(lp.decoded_token or "", max(lp.logprob, -9999.0)) for _, lp in top if lp.rank is not None],
        ))
    return out


def _to_delta(output: Any, choice: Any, first: bool) -> OutputDelta:
    queue_time = None
    metrics = getattr(output, "metrics", None)
    if first and metrics is not None and metrics.scheduled_ts and metrics.queued_ts:
        queue_time = max(0.0, metrics.scheduled_ts - metrics.queued_ts)
    return OutputDelta(
        request_id=output.request_id,
        index=choice.index,
        token_ids=list(choice.token_ids),
        text=choice.text,
        logprobs=_logprobs(choice, 0),
        finish_reason=choice.finish_reason,
        stop_reason=choice.stop_reason,
        num_prompt_tokens=len(output.prompt_token_ids or ()),
        num_cached_tokens=output.num_cached_tokens or 0,
        queue_time_s=queue_time,
    )


class EngineWorker:
    """Hosts one vLLM engine. Wrapped with `ray.remote` by the pool that starts it."""

    def __init__(self, instance_id: str, role: Role, config: EngineConfig,
                 kv: KVTransferConfig | None = None) -> None:
        self.instance_id = instance_id
        self.role = role
        self.config = config
        self.kv = kv  # None: plain vLLM (a mixed instance); else pdserve's P/D connector
        self._engine: Any = None
        self._info: EngineInfo | None = None
        self._stats = _SchedulerStatsHolder()
        self._tasks: dict[str, asyncio.Task] = {}
        self._outbox: asyncio.Queue[OutputDelta] | None = None
        self._channel: Any = None  # worker.channel.OutputChannel, opened by the gateway's first read
        self._state = InstanceState.STARTING
        self._ping: asyncio.Task | None = None  # the health ping in flight to the engine core
        self._answered_at = 0.0  # monotonic: the engine core's last answer
        self._orphans = OrphanWatch()  # core requests no request task reads: aborted after a grace
        self._reaping: set[asyncio.Task] = set()  # orphan aborts on their way to the engine core

    async def start(self) -> EngineInfo:
        from vllm.v1.engine.async_llm import AsyncLLM

        if self._outbox is None:  # kept across restarts: the gateway's stream reads it
            self._outbox = asyncio.Queue()
        self._state = InstanceState.STARTING
        if self._ping is not None:  # a ping to the engine this one replaces never answers
            self._ping.cancel()
            self._ping = None
        # A new engine starts with an empty queue; the connector's running totals carry on.
        totals = self._stats.kv_transfer
        self._stats = _SchedulerStatsHolder()
        self._stats.kv_transfer = totals
        from pdserve.kv_transfer.ports import node_address, resolve_hosts

        node = node_address()  # in the actor: the node this instance landed on is the one to advertise
        connector, kv_host = None, None
        if self.kv is not None:
            kv = resolve_hosts(self.kv, node)
            connector, kv_host = connector_config(self.instance_id, kv), kv.advertise_host
        events = None
        if self.config.publish_kv_events:
            from pdserve.worker.kv_events import pick_endpoints

            # Fresh ports per start: a restarted engine's publisher starts its sequence again.
            events = pick_endpoints(node, self.kv.port_range if self.kv else None)
        args = build_engine_args(self.config, connector, events.vllm_config(self.instance_id) if events else None)
        from pdserve.worker import placement

        placement.restore_priority()  # the engine core and its worker inherit it
        with placement.spawn_affinity():
            self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(self._stats)])
        placement.pin_to_front()  # this actor's and the engine core's threads off the compute cores
        vllm_config = self._engine.vllm_config
        self._info = EngineInfo(
            instance_id=self.instance_id,
            role=self.role,
            model=self.config.model_name,
            max_model_len=vllm_config.model_config.max_model_len,
            block_size=vllm_config.cache_config.block_size,
            kv_blocks_total=vllm_config.cache_config.num_gpu_blocks or 0,
            max_logprobs=vllm_config.model_config.max_logprobs,
            kv_events_endpoint=events.endpoint if events else None,
            kv_events_replay_endpoint=events.replay_endpoint if events else None,
            node_ip=node,
            kv_host=kv_host,
        )
        self._state = InstanceState.READY
        self._answered_at = time.monotonic()
        logger.info("instance %s (%s) ready: %s", self.instance_id, self.role.value, self._info)
        return self._info

    async def restart(self) -> EngineInfo:
        """A new engine in place of a dead one; requests still held here fail as dead."""
        self._signal_children(signal.SIGKILL)  # a hung engine core would not stop when asked
        old, self._engine = self._engine, None
        self._state = InstanceState.RESTARTING
        for rid, task in list(self._tasks.items()):
            task.cancel()
            self._fail(rid, "instance restarting", "dead")
        self._tasks.clear()
        # Building the new engine blocks this actor's loop for its whole start-up: let the failures
        # above reach the gateway first, so their requests move on now, not after it.
        await asyncio.sleep(0.2)
        if old is not None:
            with contextlib.suppress(Exception):  # it is dead already; this reaps what is left
                await asyncio.to_thread(old.shutdown)
        try:
            return await self.start()
        except BaseException:
            self._state = InstanceState.DEAD
            raise

    def signal_engine(self, fault: str) -> list[int]:
        """Fault hook (needs PDSERVE_FAULT_HOOKS=1): `kill`, `freeze` or `thaw` the engine's processes.

        The engine core and its workers are this actor's child processes.
        """
        if os.environ.get(FAULTS_ENV) != "1":
            raise PermissionError(f"fault hooks are off (set {FAULTS_ENV}=1)")
        signals = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "thaw": signal.SIGCONT}
        if fault not in signals:
            raise ValueError(f"unknown fault {fault!r}; one of {sorted(signals)}")
        return self._signal_children(signals[fault])

    @staticmethod
    def _signal_children(sig: int) -> list[int]:
        import psutil

        hit = []
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                os.kill(child.pid, sig)
                hit.append(child.pid)
        return hit

    def _fail(self, request_id: str, message: str, kind: str | None) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(OutputDelta(request_id, 0, [], "", request_finished=True, error=message,
                                            error_kind=kind))
    async def submit(self, request: EngineRequest) -> None:
        if self._engine is None or self._outbox is None:
            raise RuntimeError(f"instance {self.instance_id} is {self._state.value}, not serving")
        if request.request_id in self._tasks:
            raise ValueError(f"duplicate request id {request.request_id}")
        self._tasks[request.request_id] = asyncio.create_task(self._run(request))

    async def _run(self, request: EngineRequest) -> None:
        from vllm.inputs import TokensPrompt

        assert self._outbox is not None
        seen: set[int] = set()
        try:
            stream = self._engine.generate(
                TokensPrompt(prompt_token_ids=request.prompt_token_ids),
                request.sampling_params,
                request.request_id,
            )
            async for output in stream:
                last = len(output.outputs) - 1
                for position, choice in enumerate(output.outputs):
                    delta = _to_delta(output, choice, choice.index not in seen)
                    # With n > 1 one output carries several choices: only its
                    # last delta may tell the gateway the request is over.
                    delta.request_finished = output.finished and position == last
                    self._outbox.put_nowait(delta)
                    seen.add(choice.index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine failed this request: tell the gateway, keep serving others
            kind = _error_kind(exc)
            if kind == "invalid":
                logger.info("request %s refused by the engine: %s", request.request_id, exc)
            else:
                logger.exception("request %s failed", request.request_id)
            self._fail(request.request_id, str(exc) if kind == "invalid" else f"{type(exc).__name__}: {exc}", kind)
        finally:
            self._tasks.pop(request.request_id, None)

    async def abort(self, request_ids: list[str]) -> None:
        """Stop requests wherever they are; their KV blocks are freed by vLLM."""
        live = [rid for rid in request_ids if rid in self._tasks]
        if live and self._engine is not None:
            await self._engine.abort(live)
        for rid in live:
            task = self._tasks.pop(rid, None)
            if task is not None:
                task.cancel()

    async def output_channel(self) -> Any:
        """Where the gateway reads this instance's output batches directly (`worker.channel`), opened once."""
        from pdserve.kv_transfer.ports import node_address
        from pdserve.worker.channel import OutputChannel

        if self._outbox is None:
            raise RuntimeError(f"instance {self.instance_id} is not started")
        if self._channel is None:
            self._channel = OutputChannel(self._outbox, node_address(), self.kv.port_range if self.kv else None)
        return await self._channel.start()

    async def outputs(self) -> AsyncIterator[list[OutputDelta]]:
        """Ray streaming generator: batches of deltas, for as long as the worker lives (the channel's fallback)."""
        if self._outbox is None:
            raise RuntimeError(f"instance {self.instance_id} is not started")
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            yield batch

    # -- live migration out (worker.migration): each answers a dict, {"error": ...} on refusal ----------
    async def migrate_stop(self, request_id: str) -> dict:
        """Stop `request_id` for migration: its KV stays held here; answers its token ids."""
        from pdserve.worker.migration import MIGRATE_STOP, worker_call

        return await worker_call(self._engine, self._migration_held(), MIGRATE_STOP, request_id)

    async def migrate_send(self, request_id: str, reservation: dict) -> dict:
        """Push a stopped request's KV into the target's reservation, then free it."""
        from pdserve.worker.migration import MIGRATE_SEND, worker_call

        return await worker_call(self._engine, self._migration_held(), MIGRATE_SEND, request_id, reservation)

    async def migrate_release(self, request_id: str) -> dict:
        """Free a stopped request's KV without a send (its target never reserved)."""
        from pdserve.worker.migration import MIGRATE_RELEASE, worker_call

        return await worker_call(self._engine, self._migration_held(), MIGRATE_RELEASE, request_id)

    def _migration_held(self) -> dict[str, str]:
        """Worker request id -> engine-core id of requests stopped here (kept past the stream's end)."""
        return self.__dict__.setdefault("_held_for_migration", {})

    def info(self) -> EngineInfo | None:
        return self._info

    def state(self) -> InstanceState:
        if self._state is InstanceState.READY and (self._engine is None or self._engine.errored):
            self._state = InstanceState.DEAD  # the engine core died (vLLM's monitor noticed)
        if self._state is InstanceState.READY:
            self._heartbeat()
        return self._state

    def _heartbeat(self) -> None:
        """Keep one load probe in flight to the engine core; no answer for stall_timeout_s means dead.

        The engine core answers between steps, so a busy engine answers late but answers.
        """
        now = time.monotonic()
        if self._ping is not None and self._ping.done():
            if not self._ping.cancelled() and self._ping.exception() is None:
                self._answered_at = now
                # The probe's counts are the scheduler's now; the stat logger's are from its last step.
                self._stats.num_running, self._stats.num_waiting, self._stats.kv_usage, ids = self._ping.result()
                self._reap_orphans(set(ids), now)
            self._ping = None
        if self._ping is None:
            probe = self._engine.engine_core.call_utility_async(LOAD_PROBE)
            self._ping = asyncio.get_running_loop().create_task(probe)
        if now - self._answered_at > self.config.stall_timeout_s:
            logger.error("instance %s: engine core silent for %.0f s; treating it as dead",
                         self.instance_id, now - self._answered_at)
            self._ping.cancel()
            self._state = InstanceState.DEAD

    def _reap_orphans(self, core_ids: set[str], now: float) -> None:
        if not core_ids:
            return
        # Tracked: read by a request task of this worker (the front end may still hold a request whose
        # task is gone, when a cancel lands inside vLLM's add), or held for migration.
        states = self._engine.output_processor.request_states
        tracked = {rid for rid, st in states.items() if getattr(st, "external_req_id", None) in self._tasks}
        due = self._orphans.update(core_ids, tracked | set(self._migration_held().values()), now)
        if due:
            logger.warning("instance %s: aborting %d engine-core request(s) no request task reads: %s",
                           self.instance_id, len(due), ", ".join(due))
            # Not awaited (the heartbeat never blocks): the next probe shows whether they left; a failed
            # send is logged. The task is held until done (the loop keeps only weak references).
            # Internal ids: the front end forgets them too, where it still held them.
            task = asyncio.get_running_loop().create_task(self._engine.abort(due, internal=True))
            self._reaping.add(task)
            task.add_done_callback(self._reaped)

    def _reaped(self, task: asyncio.Task) -> None:
        self._reaping.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("instance %s: aborting orphaned engine-core requests failed: %r",
                         self.instance_id, task.exception())

    async def stats(self) -> EngineStats:
        state = self.state()
        return EngineStats(
            instance_id=self.instance_id,
            role=self.role,
            num_running=self._stats.num_running,
            num_waiting=self._stats.num_waiting,
            kv_usage=self._stats.kv_usage,
            kv_blocks_total=self._info.kv_blocks_total if self._info else 0,
            in_flight=len(self._tasks),
            orphans_aborted=self._orphans.aborted,
            kv_transfer=dict(self._stats.kv_transfer),
            healthy=state.serving,
            state=state,
        )

    def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
