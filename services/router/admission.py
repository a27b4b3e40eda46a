"""Admission control: a request no placement meets the SLO of waits (bounded, with a deadline) or is refused.

Lifecycle of a request here:
  tried at once (unless requests of its class or a higher one wait: it queues behind them)
  -> placed | refused at once (429: its class's queue is full, it may not wait, the reason is
     not one waiting cures, or the policy's forecast of the queue's drain gives it no slot
     before its deadline) | queued
  -> queued: retried whenever the load changes (a prefill ended, a request finished, stats came),
     interactive requests first, each class first-come first-served; a batch request is not
     tried while an interactive one waits (batch yields)
  -> placed | refused with 429 when its deadline passes (the class's timeout, capped by its
     TTFT target: every second waited is taken off the TTFT budget it is placed with).
The forecast (`Rejection.slots_in_s`: when the 1st, 2nd, ... request like it would fit) is what
keeps refusals fast: a request at queue position k whose k-th slot comes after its deadline, or
too late for its TTFT target (with the margin, and the TTFT it would then get), is refused at
once, at arrival or at the retry that finds it so, rather than at its deadline; the queue holds
only requests predicted to get a slot in time. A policy that gives no forecast (None) queues
as before. No other wait: the queue per class is bounded (`slo.admission.*_queue`), every wait has a deadline.
Which reasons queue (`shared.slo.QUEUEABLE`): the ones capacity freeing up cures (KV room, decode
batch). "No healthy instance" stays a 503 at once, "never fits" a 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from pdserve.router.snapshot import Rejection, RequestInfo
from pdserve.shared.errors import CapacityError, PdserveError
from pdserve.shared.slo import QUEUEABLE, DecisionReason, Priority, RequestSlo, SloRejectedError
from pdserve.shared.slo_config import SloRoutingConfig

if TYPE_CHECKING:
    from pdserve.router.controller import Route

_MIN_BUDGET_S = 1e-3  # a request retried at its TTFT deadline still has a (hopeless) positive target


class PlacementRejected(CapacityError):
    """The policy refused a request that may fit later; without an admission queue, a 503."""

    def __init__(self, rejection: Rejection, request: RequestInfo) -> None:
        super().__init__(rejection.reason)
        self.rejection, self.request = rejection, request


class AdmissionObserver(Protocol):
    """What the admission queue reports (the SLO metrics implement it)."""

    def admitted(self, priority: Priority, waited_s: float, queued: bool) -> None: ...

    def rejected(self, priority: Priority, reason: DecisionReason, waited_s: float) -> None: ...

    def queue_depth(self, priority: Priority, depth: int) -> None: ...


@dataclass(eq=False)
class _Waiter:
    request: RequestInfo
    slo: RequestSlo
    attempt: Callable[[RequestInfo], "Route"]
    enqueued_at: float
    deadline: float
    future: asyncio.Future
    last: Rejection | None = None


class AdmissionQueue:
    """Per-priority bounded queues with deadlines in front of the placement policy; see the module docstring."""

    def __init__(self, config: SloRoutingConfig | None = None, observer: AdmissionObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SloRoutingConfig()
        self.observer = observer
        self.clock = clock
        self.queues: dict[Priority, deque[_Waiter]] = {p: deque() for p in (Priority.INTERACTIVE, Priority.BATCH)}
        self._waking = False
        self._forecast: dict[Priority, Rejection] = {}  # the latest refusal of the class's head, with its slots

    def depth(self, priority: Priority) -> int:
        return len(self.queues[priority])

    async def admit(self, request: RequestInfo, attempt: Callable[[RequestInfo], "Route"],
                    abandon: Callable[["Route"], None] | None = None) -> "Route":
        """A route for `request` from `attempt` (which raises `PlacementRejected`), now or after a wait."""
        now = self.clock()
        slo = request.slo or self.config.resolve()
        # Time since it arrived at the gateway (tokenizing, a backlog before the handler ran) is
        # TTFT already spent: the placement, the wait and the forecast get only what is left.
        spent = now - request.arrival_time if 0 < request.arrival_time <= now else 0.0
        slo = dataclasses.replace(slo, ttft_s=max(slo.ttft_s - spent, min(slo.ttft_s, _MIN_BUDGET_S))) \
            if spent > 0 else slo
        request = dataclasses.replace(request, slo=slo)
        rejection = None
        if not self._ahead(slo.priority):
            try:
                route = attempt(request)
            except PlacementRejected as exc:
                rejection = exc.rejection
                if rejection.code not in QUEUEABLE:
                    raise self._final(request, slo, rejection, 0.0, exc) from None
                self._forecast[slo.priority] = rejection
            else:
                self._report_admitted(slo.priority, 0.0, queued=False)
                return route
        limit, timeout = self.config.queue_limit(slo.priority)
        timeout = min(timeout, slo.ttft_s)
        if timeout <= 0 or len(self.queues[slo.priority]) >= limit:
            reason = DecisionReason.QUEUE_FULL if timeout > 0 or rejection is None else rejection.code
            raise self._refuse(request, slo, reason, rejection, 0.0)
        position = self._position(slo.priority)
        forecast = rejection or self._forecast.get(slo.priority)
        wait = _slot_wait(forecast, position)
        if wait is not None and wait > self._budget(slo, forecast, 0.0, timeout):
            raise self._refuse(request, slo, forecast.code or DecisionReason.QUEUE_FULL, forecast, 0.0, wait)
        waiter = _Waiter(request, slo, attempt, now, now + timeout, asyncio.get_running_loop().create_future(),
                         rejection)
        self.queues[slo.priority].append(waiter)
        self._report_depth()
        self.wake()
        return await self._wait(waiter, abandon)

    async def _wait(self, waiter: _Waiter, abandon: Callable[["Route"], None] | None) -> "Route":
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), max(waiter.deadline - self.clock(), 0.0))
        except asyncio.TimeoutError:
            if waiter.future.done():
                return waiter.future.result()  # placed (or refused) in the same instant
            self._remove(waiter)
            raise self._refuse(waiter.request, waiter.slo, DecisionReason.QUEUE_DEADLINE, waiter.last,
                               self.clock() - waiter.enqueued_at) from None
        except asyncio.CancelledError:
            self._remove(waiter)  # the client left while waiting
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None \
                    and abandon is not None:
                abandon(waiter.future.result())  # placed just as it left: give the load back
            raise

    def wake(self) -> None:
        """Retry the waiting requests in order; stop at the first that still does not fit (batch yields)."""
        if self._waking:
            return
        self._waking = True
        try:
            for priority in (Priority.INTERACTIVE, Priority.BATCH):
                if not self._drain(self.queues[priority]):
                    break  # its head waits on: lower classes wait behind it
        finally:
            self._waking = False
            self._report_depth()

    def _drain(self, queue: deque[_Waiter]) -> bool:
        """Place from the head of `queue` while that works; True if the queue emptied."""
        while queue:
            waiter = queue[0]
            if waiter.future.done():
                queue.popleft()
                continue
            now = self.clock()
            waited = now - waiter.enqueued_at
            if now >= waiter.deadline:
                queue.popleft()  # its own wait ends at the same deadline; refuse it here so the next goes on
                waiter.future.set_exception(self._refuse(waiter.request, waiter.slo, DecisionReason.QUEUE_DEADLINE,
                                                         waiter.last, waited))
                continue
            try:
                route = waiter.attempt(_with_budget(waiter.request, waiter.slo, waited))
            except PlacementRejected as exc:
                waiter.last = exc.rejection
                if exc.rejection.code in QUEUEABLE:
                    self._forecast[waiter.slo.priority] = exc.rejection
                    if self._refuse_late(queue, exc.rejection, now):
                        continue  # the head itself had no slot in time: the next one is the head now
                    return False
                queue.popleft()  # waiting made it hopeless (its TTFT budget is spent): refuse now
                waiter.future.set_exception(self._final(waiter.request, waiter.slo, exc.rejection, waited, exc))
                continue
            except PdserveError as exc:
                queue.popleft()
                waiter.future.set_exception(exc)
                continue
            queue.popleft()
            waiter.future.set_result(route)
            self._report_admitted(waiter.slo.priority, waited, queued=True)
        return True

    def close(self) -> None:
        """Refuse everyone waiting (the router is stopping)."""
        for queue in self.queues.values():
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(CapacityError("the server is shutting down"))
        self._report_depth()

    def _refuse_late(self, queue: deque[_Waiter], forecast: Rejection, now: float) -> bool:
        """Refuse now every waiter whose slot (by its position) comes after its deadline; True if the head was."""
        head_refused, refused = False, 0
        for position, waiter in enumerate(list(queue)):
            waited = now - waiter.enqueued_at
            wait = _slot_wait(forecast, position - refused)
            if wait is None or wait <= self._budget(waiter.slo, forecast, waited, waiter.deadline - now):
                continue
            queue.remove(waiter)
            head_refused, refused = head_refused or position == 0, refused + 1
            if not waiter.future.done():
                waiter.future.set_exception(self._refuse(waiter.request, waiter.slo, forecast.code or
                                                         DecisionReason.QUEUE_DEADLINE, forecast, waited, wait))
        return head_refused

    def _budget(self, slo: RequestSlo, forecast: Rejection | None, waited: float, left: float) -> float:
        """How long a request may still wait: its deadline, and its TTFT target less the TTFT it would get."""
        keep = 1.0 - self.config.admission.slo_margin
        ttft = forecast.ttft_after_s if forecast is not None and forecast.ttft_after_s is not None else 0.0
        return min(left, slo.ttft_s * keep - waited - ttft)

    # -- helpers ---------------------------------------------------------------------------------
    def _position(self, priority: Priority) -> int:
        """Requests that would be placed before a newcomer of `priority`: its queue position."""
        ahead = len(self.queues[priority])
        return ahead + (len(self.queues[Priority.INTERACTIVE]) if priority is Priority.BATCH else 0)

    def _ahead(self, priority: Priority) -> bool:
        """Requests of `priority` or a higher class wait: a newcomer queues behind them."""
        if self.queues[Priority.INTERACTIVE]:
            return True
        return priority is Priority.BATCH and bool(self.queues[Priority.BATCH])

    def _remove(self, waiter: _Waiter) -> None:
        queue = self.queues[waiter.slo.priority]
        if waiter in queue:
            queue.remove(waiter)
            self._report_depth()
            self.wake()  # it may have been the head others waited behind

    def _final(self, request: RequestInfo, slo: RequestSlo, rejection: Rejection, waited: float,
               exc: PlacementRejected) -> PdserveError:
        """A rejection waiting cannot cure: 429 for an SLO reason, the policy's own error otherwise."""
        if rejection.code is None or rejection.code is DecisionReason.NO_INSTANCE:
            return exc  # not an SLO matter: 503, as without admission control
        return self._refuse(request, slo, rejection.code, rejection, waited)

    def _refuse(self, request: RequestInfo, slo: RequestSlo, reason: DecisionReason, last: Rejection | None,
                waited: float, wait: float | None = None) -> SloRejectedError:
        """A 429; `wait`: the forecast wait that made it hopeless (it becomes the Retry-After when finite)."""
        retry = max(last.retry_after_s or 0.0, 0.0) if last is not None else 0.0
        if wait is not None and math.isfinite(wait):
            retry = wait
        retry = max(retry, self.config.admission.min_retry_after_s)
        if reason is DecisionReason.QUEUE_FULL:
            limit, _ = self.config.queue_limit(slo.priority)
            message = f"the {slo.priority.value} admission queue is full ({limit} requests waiting)"
        elif reason is DecisionReason.QUEUE_DEADLINE:
            message = (f"no placement met the request's SLO within {waited:.2f} s in the {slo.priority.value} "
                       "admission queue")
        else:
            message = f"the request cannot be admitted now ({slo.priority.value} class)"
        if last is not None and last.reason:
            message += f"; {last.reason}"
        if wait is not None:
            message += ("; no decode slot is forecast for it" if not math.isfinite(wait) else
                        f"; its decode slot is forecast in {wait:.2f} s, too late for its SLO")
        if self.observer is not None:
            self.observer.rejected(slo.priority, reason, waited)
        return SloRejectedError(f"{message}. Retry after {max(1, math.ceil(retry))} s, or relax the request's "
                                "SLO (x-slo-ttft-ms, x-slo-tpot-ms) or priority (x-priority: batch).",
                                reason, retry, slo.priority)

    def _report_admitted(self, priority: Priority, waited: float, queued: bool) -> None:
        if self.observer is not None:
            self.observer.admitted(priority, waited, queued)

    def _report_depth(self) -> None:
        if self.observer is not None:
            for priority, queue in self.queues.items():
                self.observer.queue_depth(priority, len(queue))


def _slot_wait(forecast: Rejection | None, position: int) -> float | None:
    """Forecast seconds until a request at queue `position` gets its slot; None: no forecast."""
    if forecast is None or forecast.slots_in_s is None:
        return None
    slots = forecast.slots_in_s
    return slots[position] if 0 <= position < len(slots) else math.inf


def _with_budget(request: RequestInfo, slo: RequestSlo, waited_s: float) -> RequestInfo:
    """The request as placed after waiting `waited_s`: that much less of its TTFT target is left."""
    return dataclasses.replace(request, slo=dataclasses.replace(slo, ttft_s=max(slo.ttft_s - waited_s, _MIN_BUDGET_S)))
