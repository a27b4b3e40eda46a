"""Per-request lifecycle timestamps and the latencies derived from them.

Lifecycle: arrival -> dispatched (placed on an instance) -> first token (from
the prefill instance when disaggregated) -> [handoff: decode's first step] ->
further tokens -> finished (ok | error | aborted | rejected). Times are
`time.monotonic()` seconds taken in the gateway, so every latency is what a
client next to the gateway would see. Definitions as in vLLM's benchmark:
TPOT = (last token - first token) / (output tokens - 1); ITL = gaps between
token arrivals (tokens arriving in one delta count as one arrival).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Outcome(str, enum.Enum):
    OK = "ok"
    ERROR = "error"
    ABORTED = "aborted"  # the client went away or cancelled
    REJECTED = "rejected"  # never admitted (bad input, no capacity)


@dataclass
class RequestLifecycle:
    request_id: str
    arrival: float = field(default_factory=time.monotonic)
    dispatched: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    outcome: Outcome | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_time_s: float | None = None  # reported by the engine
    handoff_s: float | None = None  # disaggregated only: prefill's token -> decode's first step
    inter_token: list[float] = field(default_factory=list)

    def mark_dispatched(self) -> None:
        self.dispatched = time.monotonic()

    def mark_tokens(self, count: int, now: float | None = None) -> None:
        """`count` new tokens arrived together (one delta)."""
        if count <= 0:
            return
        now = time.monotonic() if now is None else now
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.inter_token.append(now - self.last_token)
        self.last_token = now
        self.num_output_tokens += count

    def finish(self, outcome: Outcome, now: float | None = None) -> None:
        if self.outcome is None:  # the first outcome wins (e.g. abort during error handling)
            self.outcome = outcome
            self.finished = time.monotonic() if now is None else now

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.num_output_tokens < 2 or self.first_token is None or self.last_token is None:
            return None
        return (self.last_token - self.first_token) / (self.num_output_tokens - 1)
