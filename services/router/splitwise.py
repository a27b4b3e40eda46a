"""Splitwise's mixed-pool placement (Patel et al., ISCA 2024, section IV-B).

Prompt and token pools are sized for the expected load, and a burst must not
stall either: when the least-loaded prompt instance already has a long
queue, the prompt runs on a token instance instead; when no token instance
has KV room, a prompt instance takes the tokens too (and when none has
room, the request queues on a token instance, as the base policies do);
when no prompt queue is short, the request runs colocated (mixed batching)
wherever there is room.
Splitwise's scheduler tags the borrowed machines as a "mixed pool" until
they drain; this policy reaches the same choices from the snapshot alone
(load decides, no tags), so it stays pure and the simulator can replay it.
"""

from __future__ import annotations

from pdserve.router.policy import PlacementPolicy, _could_ever_fit, _has_room
from pdserve.router.snapshot import ClusterSnapshot, Decision, InstanceSnapshot, Placement, Rejection, RequestInfo
from pdserve.shared.roles import Role


class SplitwiseMixedPool(PlacementPolicy):
    """KV-aware JSQ on each pool, with Splitwise's mixed-pool fallback."""

    name = "splitwise"

    def __init__(self, max_pending_prefill_tokens: int = 8192) -> None:
        # Splitwise's prompt_max_pending_batch_tokens: beyond this, a prompt
        # waits longer for its own pool than it would take on a token machine.
        self.max_pending_prefill_tokens = max_pending_prefill_tokens

    def decide(self, request: RequestInfo, snapshot: ClusterSnapshot) -> Decision:
        # One pass to bucket by role: the simulator calls this once per request
        # on clusters of ~100 instances, so the policy's cost is the simulator's.
        prefills, decodes, mixed = [], [], []
        bucket = {Role.PREFILL: prefills, Role.DECODE: decodes, Role.MIXED: mixed}
        for i in snapshot.instances:
            if i.healthy:
                bucket[i.role].append(i)
        if not (prefills and decodes):
            return super().decide(request, snapshot)  # a colocated cluster: nothing to fall back between
        everyone = prefills + decodes + mixed
        if not any(_could_ever_fit(i, request) for i in everyone):
            return Rejection(request.request_id,
                             f"request needs KV for {request.prompt_tokens + request.max_tokens} tokens, "
                             "more than any instance holds", retryable=False)
        decode = _emptiest_with_room(request, decodes) or _emptiest_with_room(request, prefills)
        if decode is None:
            # like the base policies: queue on a token machine that can hold it, rather than refuse
            fits = [i for i in decodes if _could_ever_fit(i, request)] or [
                i for i in everyone if _could_ever_fit(i, request)]
            decode = self.pick_decode(request, tuple(fits))
        prefill = self._prefill_instance(request, prefills) or self._prefill_instance(request, decodes)
        if prefill is None:
            # both pools are loaded: mixed batching on the least-queued instance with room
            with_room = [i for i in everyone if _has_room(i, request)] or [decode]
            host = min(with_room, key=lambda i: (i.outstanding_prefill_tokens, i.kv_usage, i.instance_id))
            return Placement(request.request_id, prefill=host.instance_id, decode=host.instance_id)
        return Placement(request.request_id, prefill=prefill.instance_id, decode=decode.instance_id)

    def _prefill_instance(self, request, candidates) -> InstanceSnapshot | None:
        if not candidates:
            return None
        best = min(candidates, key=_prefill_key)
        queue_long = (best.outstanding_prefill_tokens > 0
                      and best.outstanding_prefill_tokens + request.prompt_tokens > self.max_pending_prefill_tokens)
        return None if queue_long else best

    def pick_decode(self, request, candidates):
        return min(candidates, key=lambda i: (i.kv_usage, i.outstanding, i.instance_id))

    def pick_prefill(self, request, candidates):
        return min(candidates, key=_prefill_key)


def _prefill_key(i: InstanceSnapshot) -> tuple:
    return (i.outstanding_prefill_tokens, i.num_waiting, i.instance_id)


def _emptiest_with_room(request: RequestInfo, candidates) -> InstanceSnapshot | None:
    """KV-JSQ: the instance with the lowest KV use among those with room (inlined `_has_room`, `kv_usage`)."""
    need = request.prompt_tokens + request.max_tokens
    best, best_key = None, None
    for i in candidates:
        total = i.kv_blocks_total
        if total > 0:
            if -(-need // i.block_size) > i.kv_blocks_free:
                continue
            key = (1.0 - i.kv_blocks_free / total, i.outstanding, i.instance_id)
        else:
            key = (0.0, i.outstanding, i.instance_id)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best
