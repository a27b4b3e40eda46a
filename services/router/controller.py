"""The router's thin controller: instance registry, health, stats, placement, repair.

Lifecycle of a placement:
  RequestInfo -> snapshot of the instances' latest stats -> policy.decide()
  -> Placement (an instance's client) or Rejection (a typed error)
Lifecycle of an instance, as the controller sees it:
  READY -> DEAD (its stats say the engine core died, or the actor is gone)
  -> RESTARTING (a new engine, with backoff between failed tries) -> READY.
The policy only ever places on READY instances (`InstanceSnapshot.healthy`).
The controller does the I/O (polling stats, counting outstanding requests,
restarting); the decision itself is the pure policy in `pdserve.router.policy`.
Load the router put on an instance counts from the placement on (`accounting.Ledger`:
optimistic between stats polls), a prompt's tokens until its first token (its prefill's
end). With an admission queue (`admission.AdmissionQueue`), `admit()` waits for a placement
that meets the request's SLO or refuses it with a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

from pdserve.router.accounting import Ledger, Ticket
from pdserve.router.admission import AdmissionQueue, PlacementRejected
from pdserve.router.latency_model import LatencyModel
from pdserve.router.policy import PlacementPolicy
from pdserve.router.snapshot import ClusterSnapshot, Decision, InstanceSnapshot, Placement, Rejection, RequestInfo
from pdserve.kv_transfer.reservations import ReservationSource
from pdserve.router.handoff import Handoff
from pdserve.router.resume import StreamRecovery, choose_target
from pdserve.router.prefix_tracker import PrefixTracker
from pdserve.shared.errors import ConfigError, ContextLengthExceededError
from pdserve.shared.protocol import EngineRequest, EngineStats, OutputDelta
from pdserve.shared.roles import InstanceState
from pdserve.worker.client import EngineClient

logger = logging.getLogger(__name__)

_FAILED_POLLS_DEAD = 3  # stats calls failing in a row before an instance counts as dead


class RouterObserver(Protocol):
    def decided(self, request: RequestInfo, decision: Decision) -> None: ...

    def finished(self, ticket: Ticket) -> None: ...


@dataclass(frozen=True)
class Route:
    """Where one request runs: the same client twice when colocated."""

    prefill: EngineClient
    decode: EngineClient
    ticket: Ticket | None = dataclasses.field(default=None, compare=False)  # its load in the router's ledger

    @property
    def colocated(self) -> bool:
        return self.prefill is self.decode


class Router:
    """Places requests on instances with a pure policy over a stats snapshot."""

    def __init__(self, clients: list[EngineClient], policy: PlacementPolicy,
                 on_stats: Callable[[EngineStats], None] | None = None,
                 inbox: ReservationSource | None = None, reservation_timeout_s: float = 300.0,
                 transfer_timeout_s: float = 30.0,
                 on_restart: Callable[[EngineStats], None] | None = None, restart_backoff_s: float = 1.0,
                 prefix: PrefixTracker | None = None, admission: AdmissionQueue | None = None) -> None:
        if not clients:
            raise ValueError("the router needs at least one instance")
        self.clients = {c.instance_id: c for c in clients}
        self.policy = policy
        self.inbox = inbox  # where decode instances post reservations (disaggregated pools)
        self.reservation_timeout_s = reservation_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.handoff_counters: dict[str, int] = {}
        # Streams whose instance dies go on elsewhere (router.resume); its config is set by the launcher.
        self.recovery = StreamRecovery()
        self.migrator: Any = None  # router.migration.MigrationCoordinator, set by migration.attach()
        self._on_stats = on_stats
        self._stats: dict[str, EngineStats] = {}
        self.ledger = Ledger()
        for iid in self.clients:
            self.ledger.add_instance(iid)
        self.admission = admission  # None: a request no placement meets is refused at once (503)
        # Told every policy decision and every closed ticket (predictions, timings): the SLO metrics.
        self.observer: RouterObserver | None = None
        self._poller: asyncio.Task | None = None
        self._on_restart = on_restart
        self._restart_backoff_s = restart_backoff_s
        self._restarting: dict[str, asyncio.Task] = {}
        self._next_restart: dict[str, tuple[float, float]] = {}  # instance -> (not before, next backoff)
        self.restarts: dict[str, int] = {iid: 0 for iid in self.clients}
        self.draining: set[str] = set()  # leaving: placed on no more
        self._stats_failures: dict[str, int] = {}
        self.prefix = prefix  # the prefix index (prefix-aware routing); None: snapshots carry no prefix hits

    def snapshot(self, prefix: dict[str, int] | None = None) -> ClusterSnapshot:
        """The instances' latest stats; `prefix`: leading prompt blocks each holds, for one request."""
        prefix = prefix or {}
        return ClusterSnapshot(tuple(self._instance(stats, prefix) for stats in self.latest_stats()),
                               now=time.monotonic())

    def _instance(self, stats: EngineStats, prefix: dict[str, int]) -> InstanceSnapshot:
        load = self.ledger.load(stats.instance_id, time.monotonic())
        block_size = self.clients[stats.instance_id].info.block_size
        # Placements the last poll cannot have seen hold KV the engine's figure does not show yet.
        unseen = sum(-(-tokens // block_size) for tokens in load.pending_kv_tokens)
        return InstanceSnapshot(
            instance_id=stats.instance_id,
            role=stats.role,
            healthy=stats.healthy,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            outstanding=load.outstanding,
            outstanding_prefill_tokens=load.prefill_tokens,
            kv_blocks_total=stats.kv_blocks_total,
            kv_blocks_free=max(stats.kv_blocks_free - unseen, 0),
            block_size=block_size,
            prefix_blocks=prefix.get(stats.instance_id, 0),
            outstanding_context_tokens=load.context_tokens,
            decoding=load.decoding,
            decode_rate=load.decode_rate,
            prefill_token_rate=load.prefill_token_rate,
        )

    def latest_stats(self) -> list[EngineStats]:
        """Every instance's last reported stats (healthy until a report says otherwise)."""
        out = []
        for iid, client in self.clients.items():
            stats = self._stats.get(iid) or EngineStats(iid, client.info.role, kv_blocks_total=client.info.kv_blocks_total)
            if iid in self._restarting:
                stats = dataclasses.replace(stats, healthy=False, state=InstanceState.RESTARTING)
            elif iid in self.draining:
                stats = dataclasses.replace(stats, healthy=False, state=InstanceState.DRAINING)
            out.append(dataclasses.replace(stats, restarts=self.restarts[iid]))
        return out

    def place(self, request: RequestInfo, prompt_token_ids: Sequence[int] | None = None) -> Route:
        """The instances to run `request` on; raises if it cannot be placed.

        With a prefix index and the prompt's tokens, the snapshot says how much
        of the prompt each instance holds (counts only: the policy sees no tokens).
        """
        keys, prefix, now = [], {}, time.monotonic()
        if self.prefix is not None and prompt_token_ids and self.clients:
            block_size = next(iter(self.clients.values())).info.block_size  # one size on every pool
            keys = self.prefix.keys(prompt_token_ids, block_size)
            prefix = self.prefix.lookup(keys, list(self.clients), now)
        decision = self.policy.decide(request, self.snapshot(prefix))
        if self.observer is not None:
            self.observer.decided(request, decision)
        if isinstance(decision, Rejection):
            if decision.retryable:
                raise PlacementRejected(decision, request)
            raise ContextLengthExceededError(decision.reason)
        if self.prefix is not None and keys:
            self.prefix.placed(decision, keys, prefix, request.prompt_tokens,
                               self.clients[decision.decode].info.block_size,
                               {iid: c.info.role for iid, c in self.clients.items()}, now)
        ticket = self.ledger.open(Ticket(request.request_id, decision.prefill, decision.decode, request.prompt_tokens,
                                         request.max_tokens, time.monotonic(), decision, request.slo))
        return Route(prefill=self.clients[decision.prefill], decode=self.clients[decision.decode], ticket=ticket)

    async def admit(self, request: RequestInfo, prompt_token_ids: Sequence[int] | None = None) -> Route:
        """`place()`, through the admission queue when there is one (it may wait, or refuse with a 429)."""
        if self.admission is None:
            return self.place(request, prompt_token_ids)
        return await self.admission.admit(request, lambda info: self.place(info, prompt_token_ids), self.release)

    def release(self, route: Route) -> None:
        """A placement whose request will not run (its client left as it was placed): it counts no more."""
        if route.ticket is not None:
            self.ledger.close(route.ticket)
            self._changed()

    def tokens(self, ticket: Ticket, count: int) -> None:
        """`count` output tokens of `ticket`'s request arrived; the first ends its prefill's queue share."""
        if self.ledger.tokens(ticket, count, time.monotonic()):
            self._changed()
        model = getattr(self.policy, "model", None)
        if ticket.step_gap_s is not None and isinstance(model, LatencyModel):  # calibrates the decode step
            batch, context = self.ledger.decode_batch(ticket.decode)
            model.observe_gap(ticket.decode, batch, context, ticket.step_gap_s)

    def _changed(self) -> None:
        """The load changed (a prefill ended, a request finished, stats came): waiting requests may fit."""
        if self.admission is not None:
            self.admission.wake()

    def _observe(self, ticket: Ticket) -> None:
        """A finished request's actual latencies against the policy's predictions (calibration, metrics)."""
        placement = ticket.placement
        model = getattr(self.policy, "model", None)
        if isinstance(model, LatencyModel) and isinstance(placement, Placement):
            model.observe_finished(placement, ticket.ttft_s, ticket.first_gap_s)
        if self.observer is not None:
            self.observer.finished(ticket)

    def stream(self, route: Route, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        """The request's deltas from its route: one engine, or P then D with a KV handoff."""
        if route.colocated:
            where = (route.decode.instance_id, request.request_id)
            return self.recovery.wrap(request, route.decode.generate, lambda: where, self.resume_target)
        if self.inbox is None:
            raise ConfigError("disaggregated routes need a reservation inbox")
        handoff = Handoff(route.prefill, route.decode, self.inbox, self.reservation_timeout_s,
                          self.transfer_timeout_s, self.handoff_counters)
        return self.recovery.wrap(request, handoff.stream, handoff.where, self.resume_target)

    def resume_target(self, exclude: set[str], prompt_tokens: int) -> EngineClient | None:
        """Where a stream whose instance failed goes on (`resume.choose_target`), or None."""
        iid = choose_target(self.snapshot(), exclude, prompt_tokens)
        return None if iid is None else self.clients[iid]

    @contextlib.contextmanager
    def track(self, route: Route, prompt_tokens: int):
        """The request runs while the block does: its ticket (placement's, or a new one) is started, then closed.

        Yields the ticket; report its tokens with `tokens()` so that its prompt stops counting
        on the prefill instance when the prefill ends.
        """
        ticket = getattr(route, "ticket", None) or self.ledger.open(Ticket(
            "", route.prefill.instance_id, route.decode.instance_id, prompt_tokens, 0, time.monotonic()))
        self.ledger.start(ticket)
        try:
            yield ticket
        finally:
            self.ledger.close(ticket)
            self._observe(ticket)
            self._changed()

    async def refresh(self) -> None:
        """Fetch every instance's stats once; start repairing the dead ones."""
        clients = list(self.clients.items())  # instances may come and go while the stats are fetched
        started = time.monotonic()
        results = await asyncio.gather(*(c.stats() for _, c in clients), return_exceptions=True)
        for (iid, client), result in zip(clients, results):
            if iid not in self.clients:
                continue  # removed meanwhile
            if isinstance(result, BaseException):
                # Unhealthy at once; dead (and restarted) only if it keeps failing: one lost RPC
                # must not cost a healthy engine its restart.
                self._stats_failures[iid] = self._stats_failures.get(iid, 0) + 1
                logger.warning("stats of %s failed (%d in a row): %s", iid, self._stats_failures[iid], result)
                state = InstanceState.DEAD if self._stats_failures[iid] >= _FAILED_POLLS_DEAD else \
                    (self._stats.get(iid) or EngineStats(iid, client.info.role)).state
                result = EngineStats(iid, client.info.role, healthy=False, state=state)
            else:
                self._stats_failures[iid] = 0
                self.ledger.polled(iid, started)
            self._stats[iid] = result
            if self._on_stats is not None:
                self._on_stats(result)
            if result.state is InstanceState.DEAD:
                self._schedule_restart(iid)
        for ticket in self.ledger.expire(time.monotonic()):
            logger.warning("placement of %s on %s/%s never started: no longer counted", ticket.request_id,
                           ticket.prefill, ticket.decode)
        self._changed()

    def _schedule_restart(self, iid: str) -> None:
        not_before, _ = self._next_restart.get(iid, (0.0, self._restart_backoff_s))
        if iid in self._restarting or time.monotonic() < not_before:
            return
        self._restarting[iid] = asyncio.get_running_loop().create_task(self._restart(iid))

    async def _restart(self, iid: str) -> None:
        """One try at a new engine; a failed try doubles the wait before the next (up to 60 s)."""
        client = self.clients[iid]
        _, backoff = self._next_restart.get(iid, (0.0, self._restart_backoff_s))
        logger.warning("instance %s is dead: restarting it", iid)
        try:
            await client.restart()
        except Exception as exc:  # noqa: BLE001 - counted, logged, retried after the backoff
            logger.error("restart of %s failed (next try in %.0f s): %s", iid, backoff, exc)
            self._next_restart[iid] = (time.monotonic() + backoff, min(backoff * 2, 60.0))
            return
        finally:
            self._restarting.pop(iid, None)
        self._next_restart.pop(iid, None)
        self.restarts[iid] += 1
        stats = EngineStats(iid, client.info.role, kv_blocks_total=client.info.kv_blocks_total)
        self._stats[iid] = stats  # the next poll brings its real figures
        if self.prefix is not None:
            self.prefix.restarted(client.info)  # the old engine's cache died with it
        if self._on_restart is not None:
            self._on_restart(stats)
        logger.info("instance %s is back", iid)

    # -- the live registry: instances join when ready and leave drained -------------------------
    def register(self, client: EngineClient) -> None:
        """A started instance joins: the next placement may use it."""
        iid = client.instance_id
        if iid in self.clients:
            raise ConfigError(f"instance {iid} is registered already")
        self.clients[iid] = client
        self.ledger.add_instance(iid)
        self.restarts[iid] = 0
        self._stats[iid] = EngineStats(iid, client.info.role, kv_blocks_total=client.info.kv_blocks_total)
        if self.prefix is not None:
            self.prefix.restarted(client.info)  # its cache starts empty
        logger.info("instance %s (%s) registered", iid, client.info.role.value)

    async def drain(self, iid: str, timeout_s: float) -> bool:
        """Stop placing on `iid` and wait (up to `timeout_s`) for its requests to end; True if they did."""
        if iid not in self.clients:
            raise ConfigError(f"no instance {iid}")
        self.draining.add(iid)
        deadline = time.monotonic() + timeout_s
        # Requests whose streams opened; a placement that never starts expires instead.
        while self.ledger.load(iid).started:
            if time.monotonic() >= deadline:
                logger.warning("instance %s: drain timed out after %.0f s with requests left", iid, timeout_s)
                return False
            await asyncio.sleep(0.1)
        return True

    def unregister(self, iid: str) -> EngineClient:
        """Forget `iid` (drained or dead for good); returns its client for the caller to stop."""
        client = self.clients.pop(iid)
        for table in (self.restarts, self._stats, self._stats_failures, self._next_restart):
            table.pop(iid, None)
        self.ledger.remove_instance(iid)
        self.draining.discard(iid)
        if self.prefix is not None:
            self.prefix.forget(iid)  # its events stop; nothing may be placed there for its cache
        task = self._restarting.pop(iid, None)
        if task is not None:
            task.cancel()
        logger.info("instance %s left", iid)
        return client

    def start(self, interval_s: float) -> None:
        if self.prefix is not None:
            self.prefix.start([c.info for c in self.clients.values()])
        async def poll() -> None:
            while True:
                await self.refresh()
                await asyncio.sleep(interval_s)

        self._poller = asyncio.get_running_loop().create_task(poll())

    async def close(self) -> None:
        if self.admission is not None:
            self.admission.close()
        for task in [self._poller, *self._restarting.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)
        if self.prefix is not None:
            self.prefix.close()
