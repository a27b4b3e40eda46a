"""Placement policies: `decide(request, snapshot) -> Placement | Rejection`.

Pure code: no I/O, no clocks, no handles. The live controller and the
cluster simulator (`pdserve.planner`) call the same classes with snapshots
they build, so a policy is tested once, without engines.

Order of choice follows the design: the decode instance first (it must have
KV room for the whole request), then the prefill instance. On a cluster with
only `mixed` instances, the same instance does both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from pdserve.router.snapshot import (
    ClusterSnapshot,
    Decision,
    InstanceSnapshot,
    Placement,
    Rejection,
    RequestInfo,
)
from pdserve.shared.roles import Role


def _has_room(instance: InstanceSnapshot, request: RequestInfo) -> bool:
    if instance.kv_blocks_total <= 0:  # capacity unknown yet: let the engine queue it
        return True
    return instance.blocks_for(request.prompt_tokens + request.max_tokens) <= instance.kv_blocks_free


def _could_ever_fit(instance: InstanceSnapshot, request: RequestInfo) -> bool:
    if instance.kv_blocks_total <= 0:
        return True
    return instance.blocks_for(request.prompt_tokens + request.max_tokens) <= instance.kv_blocks_total


class PlacementPolicy(ABC):
    """Chooses a decode instance (with KV room), then a prefill instance."""

    name: ClassVar[str]

    def decide(self, request: RequestInfo, snapshot: ClusterSnapshot) -> Decision:
        disaggregated = bool(snapshot.by_role(Role.PREFILL)) and bool(snapshot.by_role(Role.DECODE))
        # With a whole pool down, any healthy engine runs requests whole (prefill
        # and decode instances are full vLLM engines): a dead pool costs latency.
        decoders = snapshot.by_role(Role.DECODE) if disaggregated else (
            snapshot.by_role(Role.MIXED) or snapshot.by_role(Role.DECODE) or snapshot.by_role(Role.PREFILL))
        if not decoders:
            return Rejection(request.request_id, "no healthy instance to serve the request")
        if not any(_could_ever_fit(d, request) for d in decoders):
            return Rejection(
                request.request_id,
                f"request needs KV for {request.prompt_tokens + request.max_tokens} tokens, "
                "more than any instance holds",
                retryable=False,
            )
        # Prefer instances with KV room now; when none has, queue on one that
        # can hold the request at all (the engine waits for blocks to free)
        # rather than refuse work the cluster will have room for shortly.
        with_room = tuple(d for d in decoders if _has_room(d, request))
        fits = with_room or tuple(d for d in decoders if _could_ever_fit(d, request))
        decode = self.pick_decode(request, fits)
        if not disaggregated:
            return Placement(request.request_id, prefill=decode.instance_id, decode=decode.instance_id)
        prefill = self.pick_prefill(request, snapshot.by_role(Role.PREFILL))
        return Placement(request.request_id, prefill=prefill.instance_id, decode=decode.instance_id)

    @abstractmethod
    def pick_decode(self, request: RequestInfo, candidates: tuple[InstanceSnapshot, ...]) -> InstanceSnapshot:
        """Choose among healthy decode-capable instances (non-empty; those with KV room if any)."""

    @abstractmethod
    def pick_prefill(self, request: RequestInfo, candidates: tuple[InstanceSnapshot, ...]) -> InstanceSnapshot:
        """Choose among healthy prefill instances (non-empty)."""


class RoundRobin(PlacementPolicy):
    """Cycles through candidates in instance-id order; blind to load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn: dict[str, int] = {"decode": 0, "prefill": 0}

    def _next(self, phase: str, candidates: tuple[InstanceSnapshot, ...]) -> InstanceSnapshot:
        ordered = sorted(candidates, key=lambda i: i.instance_id)
        chosen = ordered[self._turn[phase] % len(ordered)]
        self._turn[phase] += 1
        return chosen

    def pick_decode(self, request, candidates):
        return self._next("decode", candidates)

    def pick_prefill(self, request, candidates):
        return self._next("prefill", candidates)


class LeastLoaded(PlacementPolicy):
    """Fewest outstanding requests (decode) and fewest queued prompt tokens (prefill)."""

    name = "least_loaded"

    def pick_decode(self, request, candidates):
        return min(candidates, key=lambda i: (i.outstanding, i.num_running + i.num_waiting, i.instance_id))

    def pick_prefill(self, request, candidates):
        return min(candidates, key=lambda i: (i.outstanding_prefill_tokens, i.outstanding, i.instance_id))


class ShortestQueueKV(PlacementPolicy):
    """Join-shortest-queue on KV use: the decode instance with the most free KV."""

    name = "kv_jsq"

    def pick_decode(self, request, candidates):
        return min(candidates, key=lambda i: (i.kv_usage, i.outstanding, i.instance_id))

    def pick_prefill(self, request, candidates):
        return min(candidates, key=lambda i: (i.outstanding_prefill_tokens, i.num_waiting, i.instance_id))
