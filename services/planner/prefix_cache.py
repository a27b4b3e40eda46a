"""A per-instance prefix cache for the simulator: what prefix-aware routing is judged by.

A trace with sessions (`Sessions`) says, per request, which conversation it
belongs to and how many of its prompt tokens repeat that conversation's
earlier context. Each simulated instance keeps, per conversation, how many
leading tokens of it it holds (what it last prefilled or received), least
recently used conversation out first when the instance's KV capacity in
tokens is exceeded, as vLLM's LRU prefix cache does at block granularity.

The simulator builds the snapshot's `InstanceSnapshot.prefix_blocks` from
`held()`, exactly the opaque count the live controller puts there, so the
router's prefix-aware policy runs unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pdserve.planner.trace import Trace


@dataclass(frozen=True)
class Sessions:
    """Per request: its conversation (-1: none) and prompt tokens shared with that conversation's past."""

    session: np.ndarray  # int64
    shared: np.ndarray  # int64, <= the request's prompt tokens

    def __post_init__(self) -> None:
        if len(self.session) != len(self.shared):
            raise ValueError("session and shared must have one entry per request")


def multi_turn(conversations: int, turns: int, turn_tokens: int) -> tuple[np.ndarray, Sessions]:
    """Prompt lengths and sessions of conversations whose every turn resends the previous prompt.

    Requests are interleaved turn by turn (all first turns, then all second ones...): the arrival
    order a replay with think time gives.
    """
    prompt, session, shared = [], [], []
    for t in range(turns):
        for c in range(conversations):
            prompt.append((t + 1) * turn_tokens)
            session.append(c)
            shared.append(t * turn_tokens)
    return np.array(prompt, dtype=np.int64), Sessions(np.array(session, dtype=np.int64),
                                                       np.array(shared, dtype=np.int64))


class PrefixCacheModel:
    """Per instance: conversation -> leading tokens held, LRU within the instance's KV capacity."""

    def __init__(self, capacity_tokens: list[int]) -> None:
        self._capacity = list(capacity_tokens)
        self._held: list[OrderedDict] = [OrderedDict() for _ in capacity_tokens]
        self._total = [0] * len(capacity_tokens)

    def held(self, instance: int, session: int, shared: int) -> int:
        """Leading prompt tokens the instance holds of a request of `session` sharing `shared` tokens."""
        if session < 0:
            return 0
        return min(self._held[instance].get(session, 0), shared)

    def store(self, instance: int, session: int, tokens: int) -> None:
        """The instance computed or received the session's first `tokens` tokens."""
        if session < 0:
            return
        held = self._held[instance]
        old = held.pop(session, 0)
        held[session] = max(old, tokens)
        self._total[instance] += held[session] - old
        while self._total[instance] > self._capacity[instance] and len(held) > 1:
            _, dropped = held.popitem(last=False)
            self._total[instance] -= dropped


def as_conversations(trace: "Trace", turns: int) -> tuple["Trace", Sessions]:
    """The trace's requests as conversations of `turns` turns, each resending its history.

    Arrivals and outputs stay; request k (in arrival order) is turn k // C of conversation k % C,
    C = ceil(n / turns), and its prompt is its own length plus the prompts of that conversation's
    earlier turns (the previous prompt is the shared history; the answers are left out, as
    `scripts/bench_prefix.py` does).
    """
    from pdserve.planner.trace import Trace

    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    n = len(trace)
    conversations = max(-(-n // turns), 1)
    session = np.arange(n, dtype=np.int64) % conversations
    prompt = np.empty(n, dtype=np.int64)
    shared = np.empty(n, dtype=np.int64)
    history = np.zeros(conversations, dtype=np.int64)
    for k in range(n):
        c = session[k]
        shared[k] = history[c]
        prompt[k] = history[c] + trace.prompt[k]
        history[c] = prompt[k]
    return Trace(trace.name, trace.arrival, prompt, trace.output), Sessions(session, shared)
