"""The router's own count of the load it put on each instance, from the moment it places a request.

Engines report their queues every stats poll (0.5 s by default); between two polls a burst of
placements would all read the same figures and herd onto one instance. So every placement opens
a `Ticket` that counts at once (optimistic accounting) and the next poll corrects it:

  PLACED (policy chose; counts, KV reserved in the router's view)
  -> RUNNING (its engine streams opened)
  -> PREFILLED (first token: its prompt left the prefill instance's queue, as in the simulator)
  -> DONE (finished, failed or aborted: it counts nowhere)

A ticket's KV blocks count against its decode instance's free blocks only until a stats poll
that started after the placement has answered (that poll's figures include them). A PLACED
ticket whose request never started (a client gone before its stream opened) expires after
`placed_ttl_s`. Pure bookkeeping: times come from the caller.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from pdserve.router.snapshot import DecodeLoad, Placement
from pdserve.shared.slo import RequestSlo


class TicketState(enum.Enum):
    PLACED = "placed"
    RUNNING = "running"
    PREFILLED = "prefilled"
    DONE = "done"


@dataclass(eq=False)
class Ticket:
    """One placed request (one prompt): where it runs, what it costs, what was predicted, what happened."""

    request_id: str
    prefill: str
    decode: str
    prompt_tokens: int
    max_tokens: int
    placed_at: float
    placement: Placement | None = None
    slo: RequestSlo | None = None
    state: TicketState = TicketState.PLACED
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    # the latest gap between two deltas (per token) once decoding, and the handoff's first gap
    step_gap_s: float | None = None
    first_gap_s: float | None = None

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def context_tokens(self) -> int:
        """Context of the request on its decode instance, averaged over its decode (prompt + half its output)."""
        return self.prompt_tokens + self.max_tokens // 2

    @property
    def ttft_s(self) -> float | None:
        """Placement to first token: what the policy's TTFT prediction (queue + prefill) stands for."""
        return None if self.first_token_at is None else self.first_token_at - self.placed_at

    @property
    def tpot_s(self) -> float | None:
        if self.tokens < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (self.tokens - 1)

    def decode_load(self, now: float) -> DecodeLoad:
        """What is left of its decode and of its TPOT budget (its target times its gaps, less time spent)."""
        remaining = max(self.max_tokens - self.tokens, 0)
        if self.slo is None:
            return DecodeLoad(remaining, math.inf, self.kv_tokens)
        spent = 0.0 if self.first_token_at is None else now - self.first_token_at
        return DecodeLoad(remaining, self.slo.tpot_s * max(self.max_tokens - 1, 1) - spent, self.kv_tokens)


@dataclass(frozen=True)
class InstanceLoad:
    outstanding: int = 0  # requests placed on it as decode (or colocated) and not done
    started: int = 0  # of those (and prefills on it), the ones whose engine streams opened
    prefill_tokens: int = 0  # prompt tokens placed on it and not yet prefilled
    context_tokens: int = 0  # context of its outstanding decodes (prompt + expected half output)
    pending_kv_tokens: tuple[int, ...] = ()  # per placement the last poll cannot have seen: its KV tokens
    decoding: tuple[DecodeLoad, ...] = ()  # per request decoding (or to decode) here; empty without `now`
    decode_rate: float = 0.0  # decode placements per second over the last `rate_window_s`
    prefill_token_rate: float = 0.0  # prompt tokens placed to prefill per second, same window


@dataclass
class Ledger:
    placed_ttl_s: float = 5.0
    rate_window_s: float = 10.0
    _tickets: dict[str, set[Ticket]] = field(default_factory=dict)  # instance id -> tickets touching it
    _polled: dict[str, float] = field(default_factory=dict)  # instance id -> start of its last answered poll
    # instance id -> (placed at, prompt tokens prefilled there, 1 if it decodes there) of recent placements
    _recent: dict[str, deque] = field(default_factory=dict)

    def add_instance(self, iid: str) -> None:
        self._tickets.setdefault(iid, set())

    def remove_instance(self, iid: str) -> None:
        self._tickets.pop(iid, None)
        self._polled.pop(iid, None)
        self._recent.pop(iid, None)

    def open(self, ticket: Ticket) -> Ticket:
        """Count `ticket` on its instances (those still registered); a new placement counts in their rates."""
        for iid in {ticket.prefill, ticket.decode}:
            if iid in self._tickets:
                if ticket not in self._tickets[iid] and ticket.state is TicketState.PLACED:
                    prompt = ticket.prompt_tokens if ticket.prefill == iid else 0
                    self._recent.setdefault(iid, deque()).append((ticket.placed_at, prompt, int(ticket.decode == iid)))
                self._tickets[iid].add(ticket)
        return ticket

    def start(self, ticket: Ticket) -> None:
        if ticket.state is TicketState.PLACED:
            ticket.state = TicketState.RUNNING
            self.open(ticket)  # an expired placement that starts after all counts again

    def tokens(self, ticket: Ticket, count: int, now: float) -> bool:
        """`count` output tokens arrived; True if they were the first (the prompt is prefilled)."""
        if count <= 0:
            return False
        first = ticket.first_token_at is None
        ticket.step_gap_s = None
        if first:
            ticket.first_token_at = now
        elif ticket.tokens == 1:
            ticket.first_gap_s = now - ticket.first_token_at  # P's token to D's first: the handoff's gap
        elif ticket.last_token_at is not None:
            ticket.step_gap_s = (now - ticket.last_token_at) / count
        ticket.last_token_at, ticket.tokens = now, ticket.tokens + count
        if ticket.state in (TicketState.PLACED, TicketState.RUNNING):
            ticket.state = TicketState.PREFILLED
        return first

    def close(self, ticket: Ticket) -> None:
        ticket.state = TicketState.DONE
        self._uncount(ticket)

    def _uncount(self, ticket: Ticket) -> None:
        for iid in {ticket.prefill, ticket.decode}:
            self._tickets.get(iid, set()).discard(ticket)

    def polled(self, iid: str, started_at: float) -> None:
        """A stats poll of `iid` sent at `started_at` answered: placements before it are in its figures."""
        self._polled[iid] = max(started_at, self._polled.get(iid, started_at))

    def expire(self, now: float) -> list[Ticket]:
        """Drop placements whose requests never started within `placed_ttl_s`; returns them."""
        stale = {t for tickets in self._tickets.values() for t in tickets
                 if t.state is TicketState.PLACED and now - t.placed_at > self.placed_ttl_s}
        for ticket in stale:
            self._uncount(ticket)  # still PLACED: should its request start after all, it counts again
        return sorted(stale, key=lambda t: t.placed_at)

    def decode_batch(self, iid: str) -> tuple[int, int]:
        """(requests past their first token decoding on `iid`, their context tokens now): its running batch."""
        batch = context = 0
        for t in self._tickets.get(iid, ()):
            if t.decode == iid and t.state is TicketState.PREFILLED:
                batch, context = batch + 1, context + t.prompt_tokens + t.tokens
        return batch, context

    def load(self, iid: str, now: float | None = None) -> InstanceLoad:
        """What the router put on `iid`; with `now`, also each decode's budget and the recent rates."""
        tickets = self._tickets.get(iid, ())
        polled = self._polled.get(iid)
        outstanding = started = prefill = context = 0
        pending: list[int] = []
        decoding: list[DecodeLoad] = []
        for t in tickets:
            unseen = polled is None or t.placed_at >= polled
            if t.state is not TicketState.PLACED:
                started += 1
            if t.prefill == iid and t.state in (TicketState.PLACED, TicketState.RUNNING):
                prefill += t.prompt_tokens
                if unseen and t.decode != iid:
                    pending.append(t.prompt_tokens)  # P holds the prompt's KV until it is sent
            if t.decode == iid:
                outstanding += 1
                context += t.context_tokens
                if unseen:
                    pending.append(t.kv_tokens)
                if now is not None:
                    decoding.append(t.decode_load(now))
        if now is None:
            return InstanceLoad(outstanding, started, prefill, context, tuple(pending))
        decode_rate, token_rate = self._rates(iid, now)
        return InstanceLoad(outstanding, started, prefill, context, tuple(pending), tuple(decoding), decode_rate,
                            token_rate)

    def _rates(self, iid: str, now: float) -> tuple[float, float]:
        recent = self._recent.get(iid)
        if not recent:
            return 0.0, 0.0
        while recent and recent[0][0] < now - self.rate_window_s:
            recent.popleft()
        return sum(r[2] for r in recent) / self.rate_window_s, sum(r[1] for r in recent) / self.rate_window_s

    def tickets(self, iid: str) -> frozenset[Ticket]:
        return frozenset(self._tickets.get(iid, ()))
