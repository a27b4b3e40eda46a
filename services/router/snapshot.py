"""What the router's policies see: immutable snapshots, no handles, no block tables.

The controller builds a `ClusterSnapshot` from the instances' latest stats;
the cluster simulator builds the same type from its model of the cluster.
Policies read nothing else, which is what lets one policy drive both.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.shared.roles import Role
from pdserve.shared.slo import DecisionReason, RequestSlo


@dataclass(frozen=True)
class DecodeLoad:
    """One request the router routed to an instance to decode, not yet finished (SLO-aware policy's view)."""

    remaining_tokens: int  # output tokens still to come (max_tokens less those streamed)
    budget_s: float  # decode time it may still take and meet its TPOT target (inf: no target)
    kv_tokens: int = 0  # KV it holds at its end (prompt + max_tokens), freed when it finishes


@dataclass(frozen=True)
class InstanceSnapshot:
    """One engine instance as the router sees it at one moment."""

    instance_id: str
    role: Role
    healthy: bool = True
    num_running: int = 0  # requests in the engine's running batch
    num_waiting: int = 0  # requests queued inside the engine
    outstanding: int = 0  # dispatched by the router and not yet finished
    outstanding_prefill_tokens: int = 0  # prompt tokens dispatched and not yet prefilled
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    block_size: int = 16
    hardware: str = ""  # free-form machine type, e.g. "a100" (for heterogeneous pools)
    # Leading blocks of the request being placed that the instance holds in its prefix cache (the
    # router's prefix index; 0 when unknown). Per request: snapshots are built for one decision.
    prefix_blocks: int = 0
    # prompt + expected output tokens of the requests decoding here (the router's estimate; 0: unknown)
    outstanding_context_tokens: int = 0
    # The router's per-request view of what decodes here (empty: unknown) and its recent placement rates
    decoding: tuple[DecodeLoad, ...] = ()
    decode_rate: float = 0.0  # requests placed here to decode per second, lately
    prefill_token_rate: float = 0.0  # prompt tokens placed here to prefill per second, lately

    @property
    def kv_usage(self) -> float:
        if self.kv_blocks_total <= 0:
            return 0.0
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_tokens(self, prompt_tokens: int) -> int:
        """Prompt tokens the instance need not compute (vLLM always computes the last one)."""
        return max(0, min(self.prefix_blocks * self.block_size, prompt_tokens - 1))


@dataclass(frozen=True)
class ClusterSnapshot:
    """All instances, at the time `now` (seconds, the caller's clock)."""

    instances: tuple[InstanceSnapshot, ...]
    now: float = 0.0

    def by_role(self, *roles: Role) -> tuple[InstanceSnapshot, ...]:
        return tuple(i for i in self.instances if i.role in roles and i.healthy)


@dataclass(frozen=True)
class RequestInfo:
    """What the router knows of a request: lengths, never contents."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_time: float = 0.0
    slo: RequestSlo | None = None  # None: the policy's defaults


@dataclass(frozen=True)
class Placement:
    """Where a request runs. For a colocated request, prefill == decode."""

    request_id: str
    prefill: str
    decode: str
    # SLO-aware placements say why and what they predict (None from the other policies)
    reason: DecisionReason | None = None
    predicted_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    # the latency model's uncalibrated inputs behind them (what online calibration learns from)
    basis: tuple[float, ...] | None = None

    @property
    def colocated(self) -> bool:
        return self.prefill == self.decode


@dataclass(frozen=True)
class Rejection:
    """The request cannot be placed; `reason` is shown to the client and counted."""

    request_id: str
    reason: str
    retryable: bool = True  # True: capacity may free up; False: it can never fit
    code: DecisionReason | None = None  # the SLO-aware policy's reason, for metrics and admission
    retry_after_s: float | None = None  # its estimate of when capacity frees up
    # Predicted seconds from now until the 1st, 2nd, ... request like this one could be placed
    # (the admission queue's drain); None: the policy does not say; () : not foreseeable.
    slots_in_s: tuple[float, ...] | None = None
    ttft_after_s: float | None = None  # predicted TTFT once placed (a wait comes on top)


Decision = Placement | Rejection
