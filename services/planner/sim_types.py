"""The simulator's state and results: instance specs, per-instance engine state, per-request outcomes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pdserve.planner.perf_model import PerfModel
from pdserve.shared.roles import Role


@dataclass(frozen=True)
class InstanceSpec:
    """One simulated engine instance."""

    instance_id: str
    role: Role
    hardware: str
    perf: PerfModel
    kv_tokens: int  # KV capacity in tokens


@dataclass
class _Instance:
    spec: InstanceSpec
    kv_blocks_total: int
    kv_free: int
    prefill_queue: deque = field(default_factory=deque)
    joins: deque = field(default_factory=deque)  # KV ready, waiting for a batch slot
    kv_wait: deque = field(default_factory=deque)  # placed here, waiting for KV blocks to free
    kv_wait_blocks: int = 0
    finish_heap: list = field(default_factory=list)  # (finish_step, request)
    steps: int = 0  # decode steps completed so far
    ctx_base: int = 0  # sum(prompt + 1 - join_step) over the running batch
    outstanding: int = 0
    pending_prefill_tokens: int = 0
    busy: bool = False
    kind: int = 0  # 1 prefill iteration, 2 decode run
    start: float = 0.0
    step_time: float = 0.0
    planned_steps: int = 0
    batch: list = field(default_factory=list)  # requests in the running prefill iteration
    takes: list | None = None  # chunked prefill: their tokens in it
    batch_tokens: int = 0  # their prompt tokens
    rides_along: bool = False  # decoders advance a step in this prefill iteration
    version: int = 0
    busy_time: float = 0.0
    end: float = 0.0  # when the running iteration ends (as planned)
    pos: int = 0  # index in the simulator's instance list


@dataclass
class SimResult:
    """Per-request outcome, in trace order; times in seconds from the trace's start."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    first_token: np.ndarray  # NaN if rejected
    finish: np.ndarray  # NaN if rejected
    handoff: np.ndarray  # exposed KV handoff, 0 if colocated
    colocated: np.ndarray  # bool
    reject_reason: list  # None, or the reason
    busy_fraction: dict  # instance id -> busy time / makespan
    wall_s: float
    events: int
    prefill_computed: np.ndarray | None = None  # prompt tokens prefilled (prompt minus prefix-cache hits)
    kv_sent_tokens: np.ndarray | None = None  # tokens of KV handed to decode (0 colocated; minus D's hit)

    @property
    def finished(self) -> np.ndarray:
        return ~np.isnan(self.finish)

    @property
    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> np.ndarray:
        return self.finish - self.arrival

    @property
    def tpot(self) -> np.ndarray:
        """Mean time per output token after the first; NaN for one-token requests."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.output > 1, (self.finish - self.first_token) / (self.output - 1), np.nan)

    @property
    def num_rejected(self) -> int:
        return sum(r is not None for r in self.reject_reason)

    @property
    def requests_per_wall_s(self) -> float:
        return len(self.arrival) / self.wall_s if self.wall_s > 0 else float("inf")
