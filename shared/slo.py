"""Per-request latency targets and priority classes, as the gateway resolves them and the router reads them.

A request's SLO comes from the configuration's defaults for its priority class
(`slo.interactive`, `slo.batch`), overridden per request by the headers
`x-slo-ttft-ms`, `x-slo-tpot-ms`, `x-priority` or the body fields
`slo_ttft_ms`, `slo_tpot_ms`, `slo_priority` (headers win). Plain types only:
the router and the simulator import this without the gateway.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from http import HTTPStatus

from pdserve.shared.errors import PdserveError


class Priority(str, enum.Enum):
    """Who yields: batch-class requests wait behind interactive ones and leave them KV headroom."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class DecisionReason(str, enum.Enum):
    """Why the SLO-aware router placed, queued or refused a request (a metric label, and the client's message)."""

    PLACED = "placed"  # P and D (or one mixed instance) within the SLO
    FALLBACK_DECODE_PREFILLS = "fallback_decode_prefills"  # prefill pool saturated: D prefills a short prompt
    FALLBACK_PREFILL_DECODES = "fallback_prefill_decodes"  # no D meets TPOT / has room: a P decodes too
    NO_INSTANCE = "no_instance"
    NEVER_FITS = "never_fits"  # more KV than any instance holds
    NO_KV_ROOM = "no_kv_room"
    TTFT_UNMET = "ttft_unmet"
    TPOT_UNMET = "tpot_unmet"
    BATCH_YIELDS = "batch_yields"  # a batch request would eat the headroom kept for interactive ones
    QUEUE_FULL = "queue_full"
    QUEUE_DEADLINE = "queue_deadline"


@dataclass(frozen=True)
class RequestSlo:
    """One request's targets, in seconds, and its class."""

    ttft_s: float
    tpot_s: float
    priority: Priority = Priority.INTERACTIVE

    def met(self, ttft_s: float | None, tpot_s: float | None) -> tuple[bool, bool]:
        """(TTFT met, TPOT met); a request with one output token has no TPOT and meets it."""
        return (ttft_s is not None and ttft_s <= self.ttft_s), (tpot_s is None or tpot_s <= self.tpot_s)


# Reasons a request waits in the admission queue for: capacity that frees as running requests end.
# A prefill queue that breaks TTFT is refused at once instead: it drains no faster than the
# waiting request's own TTFT budget shrinks, so waiting would only turn a quick 429 into a late one.
QUEUEABLE = frozenset({DecisionReason.NO_KV_ROOM, DecisionReason.TPOT_UNMET, DecisionReason.BATCH_YIELDS})


class SloRejectedError(PdserveError):
    """No placement meets the request's SLO and it may not wait (any longer): HTTP 429 with Retry-After."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    error_type = "RateLimitError"

    def __init__(self, message: str, reason: DecisionReason, retry_after_s: float,
                 priority: Priority = Priority.INTERACTIVE) -> None:
        super().__init__(message)
        self.reason, self.priority = reason, priority
        self.retry_after_s = max(retry_after_s, 0.0)

    @property
    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds (RFC 9110), rounded up: never earlier than the router's estimate."""
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
