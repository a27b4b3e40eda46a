"""Prefix-aware placement: send a request where its prompt's KV cache already is, when load allows.

Pure policy over the snapshot: each candidate's `prefix_blocks` (leading
blocks of this request's prompt it holds, from the controller's prefix
index) against its load. Nothing else about the cache is visible here.

- Decode (and mixed) instance: a prefix D holds is KV that P need not send
  (D's reservation skips those blocks) and KV memory shared with the earlier
  request; on a mixed instance it is also prompt not recomputed. Score:
      hit_weight * hit_fraction - load_weight * excess
  hit_fraction: held prompt tokens / prompt tokens (0..1);
  excess: (outstanding - least outstanding among candidates) / (least + balance_slack).
  The least loaded candidate has excess 0; a full hit carries an instance
  `balance_slack` requests (at equal weights, more as the pool gets busier)
  above it before the least loaded one wins again.
- Prefill instance: what P must compute before this request's first token
  is the prompt tokens queued on it plus this prompt minus what it holds:
      load_weight * queued_prefill_tokens - hit_weight * held_tokens
  (the lowest wins).
Where no candidate holds anything, the base policy (least_loaded by default)
decides, so prefix-awareness composes with any other placement rule.
"""

from __future__ import annotations

from pdserve.router.policy import LeastLoaded, PlacementPolicy
from pdserve.router.snapshot import InstanceSnapshot, RequestInfo
from pdserve.shared.config import PrefixRoutingConfig


class PrefixAware(PlacementPolicy):
    """Longest held prefix, traded against load with configured weights."""

    name = "prefix_aware"

    def __init__(self, config: PrefixRoutingConfig | None = None, base: PlacementPolicy | None = None) -> None:
        self.config = config or PrefixRoutingConfig()
        self.base = base or LeastLoaded()

    def decode_score(self, request: RequestInfo, candidate: InstanceSnapshot, least: int) -> float:
        c = self.config
        hit = candidate.prefix_tokens(request.prompt_tokens) / max(request.prompt_tokens, 1)
        excess = (candidate.outstanding - least) / (least + c.balance_slack)
        return c.hit_weight * hit - c.load_weight * excess

    def prefill_cost(self, request: RequestInfo, candidate: InstanceSnapshot) -> float:
        c = self.config
        return c.load_weight * candidate.outstanding_prefill_tokens \
            - c.hit_weight * candidate.prefix_tokens(request.prompt_tokens)

    def pick_decode(self, request, candidates):
        if not any(i.prefix_tokens(request.prompt_tokens) for i in candidates):
            return self.base.pick_decode(request, candidates)
        least = min(i.outstanding for i in candidates)
        # Ties: the less loaded, then the lower id (deterministic, like the other policies).
        return max(candidates, key=lambda i: (self.decode_score(request, i, least), -i.outstanding,
                                              _desc(i.instance_id)))

    def pick_prefill(self, request, candidates):
        if not any(i.prefix_tokens(request.prompt_tokens) for i in candidates):
            return self.base.pick_prefill(request, candidates)
        return min(candidates, key=lambda i: (self.prefill_cost(request, i), i.outstanding, i.instance_id))


def _desc(text: str) -> tuple[int, ...]:
    """A key that sorts strings in reverse, for max() ties to fall to the lowest id."""
    return tuple(-ord(ch) for ch in text) + (1,)
