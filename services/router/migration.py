"""The migration coordinator: moves one decoding request, KV and all, from a decode instance to another.

Thin: the decisions are `router.migration_policy.decide()`'s; the instance
side is `worker.migration` (engine-core utilities) and the client's stream
switch is `router.resume.ResumableStream.move()`. This module sequences them.

Lifecycle of one stop-and-copy migration of request X from S to T
(`MigrationStage`, in order; the client sees nothing but a pause):

  STOP     S stops X between two steps and holds its blocks; answers X's
           tokens (prompt, outputs). Refused (X finishing, mid-prefill, S
           gone): nothing was done, X decodes on.
  SWITCH   the stream reads S's deltas up to the tokens S computed, then
           starts X's continuation on T: prompt + every generated token,
           what is left of max_tokens, "KV comes from elsewhere" params, and
           the generator steps S sampled (a seeded request samples on).
  RESERVE  T reserves blocks for all tokens but the last and posts a
           reservation to the router's inbox.
  SEND     S pushes the held blocks into T's; S frees them when the send
           ends. T lands them and computes the last token.
  RESUME   T's first token reaches the stream: the downtime ends
           (S's last token -> T's first, as the client sees it).

Aborts leave no block held on the side that let go:
  - the switch is called off (the client left, a boundary never came): S
    releases its blocks and the stream goes on on S by recompute of its
    tokens (S's prefix cache keeps the full blocks);
  - T never reserves (refused, dead, timeout), or its reservation is empty:
    S releases; T (if alive) recomputes, and the stream's own recovery
    handles a T that died;
  - the send fails (T died mid-copy, T's client left): S's blocks are freed
    when the send ends; T recomputes or is gone (the stream recovers).
A hold nobody sends or releases is released by S itself at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pdserve.kv_transfer.errors import TransferError
from pdserve.kv_transfer.migration import MigrationError, StoppedRequest
from pdserve.kv_transfer.params import PARAMS_KEY, DecodeParams, Reservation
from pdserve.kv_transfer.reservations import ReservationSource
from pdserve.router.migration_policy import (Migration, MigrationPolicyConfig, MigrationReason, MigrationSnapshot,
                                             RunningRequest, decide)
from pdserve.router.snapshot import ClusterSnapshot
from pdserve.router.resume import MoveAborted, ResumableStream, Seam, StreamRegistry
from pdserve.shared.config import MigrationConfig
from pdserve.shared.errors import ConfigError, EngineError
from pdserve.shared.protocol import EngineRequest
from pdserve.worker.client import EngineClient
from pdserve.worker.migration import GENERATOR_STEPS_KEY, MigrationOps, migration_ops

logger = logging.getLogger(__name__)

_WATCH_S = 0.002  # how often the first target token is looked for (the downtime's end)


class MigrationStage(str, enum.Enum):
    STOP = "stop"
    SWITCH = "switch"
    RESERVE = "reserve"
    SEND = "send"
    RESUME = "resume"
    DONE = "done"


class MigrationOutcome(str, enum.Enum):
    COMPLETED = "completed"  # T decodes on from S's KV
    REJECTED = "rejected"  # nothing was done: X decodes on where it was
    ABORTED = "aborted"  # started and called off: X goes on (on S, or on T by recompute)


@dataclass
class MigrationResult:
    """One migration's account (metrics, the bench, the tests)."""

    request_id: str
    source: str
    target: str
    reason: MigrationReason
    outcome: MigrationOutcome = MigrationOutcome.REJECTED
    stage: MigrationStage = MigrationStage.STOP  # where it ended (DONE when completed)
    error: str = ""
    tokens: int = 0  # tokens the request had generated when it moved
    kv_tokens: int = 0  # tokens whose KV went over the wire
    blocks: int = 0
    stages: int = 0  # copy rounds (1: stop-and-copy)
    downtime_s: float | None = None  # S's stop -> T's first token in the stream
    started_at: float = 0.0


@dataclass(frozen=True)
class CoordinatorConfig:
    stop_timeout_s: float = 10.0  # S's answer to the stop
    switch_timeout_s: float = 10.0  # the stream reaching the boundary, and prepare
    reservation_timeout_s: float = 30.0  # T's reservation (T may wait for KV room)
    transfer_timeout_s: float = 30.0  # T waits this long for the KV before recomputing
    resume_timeout_s: float = 60.0  # T's first token (after that the downtime is not measured)


class MigrationCoordinator:
    """Runs migrations against the live streams; one per request at a time."""

    def __init__(self, streams: StreamRegistry, clients: Mapping[str, EngineClient], inbox: ReservationSource,
                 config: CoordinatorConfig | None = None,
                 ops: Callable[[EngineClient], MigrationOps] = migration_ops,
                 on_result: Callable[[MigrationResult], None] | None = None,
                 cluster: Callable[[], ClusterSnapshot] | None = None,
                 policy: MigrationPolicyConfig | None = None) -> None:
        self.streams, self.clients, self.inbox = streams, clients, inbox
        self.cluster = cluster  # the router's snapshot (None: no policy-driven migrations, only asked ones)
        self.policy = policy or MigrationPolicyConfig()
        self.config = config or CoordinatorConfig()
        self.ops = ops
        self.on_result = on_result  # metrics
        self.in_flight: dict[str, tuple[str, str]] = {}  # request -> (source, target)
        self.results: list[MigrationResult] = []  # the latest ones (bounded)
        self.policy_errors = 0  # policy rounds that raised (run_policy logs each and goes on)
        self._ids = itertools.count(1)

    # -- what the policy reads ------------------------------------------------------------------
    def running(self) -> tuple[RunningRequest, ...]:
        """The streams decoding now, as the policy sees them."""
        out = []
        for stream in self.streams.live():
            if stream.finished:
                continue
            tokens = len(stream.prompt_token_ids) + len(stream.generated)
            out.append(RunningRequest(stream.request_id, stream.instance_id, tokens,
                                      migratable=bool(stream.generated) and not stream.moving))
        return tuple(out)

    def in_flight_tuples(self) -> tuple[tuple[str, str, str], ...]:
        return tuple((rid, s, t) for rid, (s, t) in self.in_flight.items())

    def decide(self, draining: frozenset[str] = frozenset(),
               tpot_s: dict[str, float] | None = None) -> list[Migration]:
        """The policy's migrations for the cluster now (none without a cluster snapshot)."""
        if self.cluster is None:
            return []
        snap = MigrationSnapshot(self.cluster(), self.running(), draining, self.in_flight_tuples(), tpot_s or {})
        return decide(snap, self.policy)

    async def drain(self, instance_id: str, timeout_s: float) -> bool:
        """Move every stream off a draining `instance_id`, a few at a time; True when none is left there.

        Streams that cannot move yet (still prefilling) are retried until the deadline; what is left
        then finishes where it is (the caller's drain waits for it).
        """
        deadline = time.monotonic() + timeout_s
        while self.streams.on(instance_id) and time.monotonic() < deadline:
            moves = [m for m in self.decide(frozenset({instance_id})) if m.reason is MigrationReason.DRAIN]
            if not moves:
                await asyncio.sleep(0.2)  # no room, no slot, or nothing decoding yet
                continue
            await self.apply(moves)
        return not self.streams.on(instance_id)

    # -- doing it -------------------------------------------------------------------------------
    async def apply(self, migrations: list[Migration]) -> list[MigrationResult]:
        """Run the policy's migrations concurrently (each keeps its own state)."""
        return list(await asyncio.gather(*(self.migrate(m.request_id, m.target, m.reason) for m in migrations)))

    async def migrate(self, request_id: str, target_id: str,
                      reason: MigrationReason = MigrationReason.LOAD_BALANCE) -> MigrationResult:
        stream = self.streams.get(request_id)
        source_id = stream.instance_id if stream is not None else ""
        result = MigrationResult(request_id, source_id, target_id, reason, started_at=time.monotonic())
        try:
            if stream is None or stream.finished or stream.moving or request_id in self.in_flight:
                raise MigrationError(f"request {request_id} is not a live, unmoving stream")
            source, target = self.clients.get(source_id), self.clients.get(target_id)
            if source is None or target is None or source is target:
                raise MigrationError(f"cannot move {request_id} from {source_id!r} to {target_id!r}")
            self.in_flight[request_id] = (source_id, target_id)
            try:
                await self._run(stream, source, target, result)
            finally:
                self.in_flight.pop(request_id, None)
        except (MigrationError, TransferError, EngineError) as exc:
            result.error = result.error or str(exc)
        self._finish(result)
        return result

    def _finish(self, result: MigrationResult) -> None:
        self.results = [*self.results[-255:], result]
        log = logger.info if result.outcome is MigrationOutcome.COMPLETED else logger.warning
        log("migration of %s %s -> %s (%s): %s at %s, %d tokens, downtime %s%s", result.request_id, result.source,
            result.target, result.reason.value, result.outcome.value, result.stage.value, result.tokens,
            f"{result.downtime_s * 1e3:.1f} ms" if result.downtime_s is not None else "-",
            f" ({result.error})" if result.error else "")
        if self.on_result is not None:
            self.on_result(result)

    async def _run(self, stream: ResumableStream, source: EngineClient, target: EngineClient,
                   result: MigrationResult) -> None:
        ops = self.ops(source)
        engine_id = stream.engine_request_id
        stopped_at = time.monotonic()
        try:
            stopped = await asyncio.wait_for(ops.stop(engine_id), self.config.stop_timeout_s)
        except asyncio.TimeoutError:
            # The stop may still land: make sure its blocks go and the stream does not wait on S forever.
            result.outcome, result.error = MigrationOutcome.ABORTED, "the source did not answer the stop"
            await self._undo(stream, source, ops, engine_id, None, result)
            return
        # STOP done: from here every path ends in exactly one send or one release of S's hold.
        generated = [*stopped.prompt_token_ids[len(stream.prompt_token_ids):], *stopped.output_token_ids]
        result.tokens, result.kv_tokens = len(generated), stopped.num_computed_tokens
        transfer_id = f"{stream.request_id}-mig{next(self._ids)}"
        result.stage = MigrationStage.SWITCH
        try:
            await stream.move(target, self._prepare(stream, generated, transfer_id), at_tokens=len(generated),
                              timeout_s=self.config.switch_timeout_s, reason=result.reason.value)
        except MoveAborted as exc:
            result.outcome, result.error = MigrationOutcome.ABORTED, str(exc)
            await self._undo(stream, source, ops, engine_id, stopped, result)
            return
        result.outcome = MigrationOutcome.ABORTED  # until the send is queued and T resumes
        result.stage = MigrationStage.RESERVE
        reservation = await self._reservation(transfer_id)
        if reservation is None or not reservation.decode_block_ids:
            result.error = "no reservation from the target" if reservation is None else "empty reservation"
            await self._release(ops, engine_id)  # T recomputes (or its death is the stream's to recover)
            return
        result.stage, result.blocks = MigrationStage.SEND, len(reservation.decode_block_ids)
        try:
            await asyncio.wait_for(ops.send(engine_id, reservation), self.config.stop_timeout_s)
        except (MigrationError, TransferError, EngineError, asyncio.TimeoutError) as exc:
            result.error = f"send refused: {exc}"
            await self._release(ops, engine_id)
            return
        result.stages = 1
        result.stage = MigrationStage.RESUME
        if await self._first_token(stream, len(generated)):
            result.downtime_s = time.monotonic() - stopped_at
            result.outcome, result.stage = MigrationOutcome.COMPLETED, MigrationStage.DONE
        else:
            result.error = "the target produced no token in time (or the stream ended)"
            if stream.finished:  # ended on the target (its last token, or the client left): the move held
                result.outcome, result.stage = MigrationOutcome.COMPLETED, MigrationStage.DONE

    def _prepare(self, stream: ResumableStream, generated: list[int], transfer_id: str):
        async def prepare(seam: Seam) -> EngineRequest | None:
            if list(seam.generated) != generated:
                # The stream's tokens are not the ones S holds KV for (should not happen: S stopped).
                logger.error("request %s: the seam has %d tokens, the source stopped at %d", stream.request_id,
                             len(seam.generated), len(generated))
                return None
            kv = DecodeParams(transfer_id, self.inbox.address, self.config.transfer_timeout_s).to_dict()
            params = _migrated(seam.request.sampling_params, len(generated), **{PARAMS_KEY: kv})
            return EngineRequest(seam.request.request_id, seam.request.prompt_token_ids, params,
                                 seam.request.arrival_time)
        return prepare

    async def _reservation(self, transfer_id: str) -> Reservation | None:
        deadline = time.monotonic() + self.config.reservation_timeout_s
        while (found := self.inbox.poll(transfer_id)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await self.inbox.wait(transfer_id, min(left, 0.5))
        return found

    async def _first_token(self, stream: ResumableStream, seam_at: int) -> bool:
        deadline = time.monotonic() + self.config.resume_timeout_s
        while len(stream.generated) <= seam_at and not stream.finished:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_WATCH_S)
        return len(stream.generated) > seam_at

    async def _release(self, ops: MigrationOps, engine_id: str) -> None:
        """Free S's hold; a failure here is left to S's own hold deadline (counted in the log)."""
        try:
            await asyncio.wait_for(ops.release(engine_id), self.config.stop_timeout_s)
        except (MigrationError, TransferError, EngineError, asyncio.TimeoutError) as exc:
            logger.warning("release of %s's hold failed (the source frees it at its deadline): %s", engine_id, exc)

    async def _undo(self, stream: ResumableStream, source: EngineClient, ops: MigrationOps, engine_id: str,
                    stopped: StoppedRequest | None, result: MigrationResult) -> None:
        """The switch did not happen but S stopped: free S's hold, continue the stream on S by recompute."""
        await self._release(ops, engine_id)
        if stream.finished:
            return  # the client left (or the stream ended): nothing to continue

        async def recompute(seam: Seam) -> EngineRequest:
            params = _migrated(seam.request.sampling_params, len(seam.generated))
            return EngineRequest(seam.request.request_id, seam.request.prompt_token_ids, params,
                                 seam.request.arrival_time)
        with contextlib.suppress(MoveAborted):
            # At once: S sends nothing more, so whatever the client has is where the recompute starts.
            await stream.move(source, recompute, timeout_s=self.config.switch_timeout_s, reason="migration_undo")


def _migrated(params: Any, generated: int, **extra: Any) -> Any:
    """A continuation's params with migration's entries (a clone: the seam's are not mutated)."""
    clone = params.clone()
    clone.extra_args = {**(params.extra_args or {}), GENERATOR_STEPS_KEY: generated, **extra}
    return clone


def attach(router: Any, config: MigrationConfig | None = None,
           on_result: Callable[[MigrationResult], None] | None = None) -> MigrationCoordinator:
    """Give a `controller.Router` live migration: its drains (scaling) then move requests off.

    The router must have a reservation inbox (disaggregated pools) and resumable streams.
    """
    config = config or MigrationConfig(enabled=True)
    if router.inbox is None:
        raise ConfigError("live migration needs the router's reservation inbox (disaggregated pools)")
    coordinator = CoordinatorConfig(reservation_timeout_s=config.reservation_timeout_s,
                                    switch_timeout_s=config.switch_timeout_s)
    policy = MigrationPolicyConfig(kv_spread=config.kv_spread, tpot_spread=config.tpot_spread,
                                   preempt_kv_usage=config.preempt_kv_usage, headroom_blocks=config.headroom_blocks,
                                   max_per_instance=config.max_per_instance)
    router.migrator = MigrationCoordinator(router.recovery.streams, router.clients, router.inbox, coordinator,
                                           on_result=on_result, cluster=router.snapshot, policy=policy)
    return router.migrator


async def run_policy(router: Any, interval_s: float) -> None:
    """Every `interval_s`: the policy's migrations for the router's cluster (a task the server owns)."""
    while True:
        await asyncio.sleep(interval_s)
        migrator: MigrationCoordinator = router.migrator
        try:
            moves = migrator.decide(frozenset(router.draining))
            if moves:
                await migrator.apply(moves)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad round must not end the loop for the server's lifetime
            migrator.policy_errors += 1
            logger.exception("migration policy round failed (%d so far)", migrator.policy_errors)
