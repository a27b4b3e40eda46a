"""The controller's side of prefix-aware routing: the index, its feed, and what it predicted.

Lifecycle:
  start(infos): the event subscriber follows every engine that publishes
  events (`EngineInfo.kv_events_endpoint`) -> per request: `lookup` hashes
  the prompt's full blocks (`block_hash`, as vLLM does) and asks the index
  how many leading blocks each instance holds; the controller puts those
  counts in the snapshot -> `placed` records the decision (the approximate
  record, the counters of predicted hits per role) -> `restarted(info)`: the
  instance's cache is gone (index reset to a new epoch, the new engine's
  publisher followed) -> close().

Only opaque counts leave this module; the policies never see hashes.
"""

from __future__ import annotations

import logging
from typing import Sequence

from pdserve.router.block_hash import BlockHasher, HashAlgo
from pdserve.router.kv_events import KVEventSubscriber
from pdserve.router.prefix_index import EventIndex, OverlayIndex, PrefixIndex, SentIndex
from pdserve.router.snapshot import Placement
from pdserve.shared.config import PrefixRoutingConfig
from pdserve.shared.protocol import EngineInfo
from pdserve.shared.roles import Role

logger = logging.getLogger(__name__)


class PrefixTracker:
    """Prefix index of every instance, fed by KV events or by the router's own placements."""

    def __init__(self, config: PrefixRoutingConfig) -> None:
        self.config = config
        self.hasher = BlockHasher(HashAlgo(config.hash_algo), config.hash_seed)
        self.subscriber: KVEventSubscriber | None = None
        self.index: PrefixIndex
        if config.index == "events":
            self.events = EventIndex()
            self.index = OverlayIndex(self.events, SentIndex(config.pending_ttl_s))
            self.subscriber = KVEventSubscriber(self.events, self.hasher, config.events_poll_s,
                                                config.events_replay_timeout_s)
        else:
            self.index = SentIndex(config.sent_ttl_s)
        # Per role: prompt tokens placed, and those the index said the chosen instance held.
        self.tokens: dict[str, int] = {}
        self.hit_tokens: dict[str, int] = {}

    def start(self, infos: Sequence[EngineInfo]) -> None:
        if self.subscriber is not None:
            self.subscriber.start()
        for info in infos:
            self.follow(info)

    def follow(self, info: EngineInfo) -> None:
        """Track an instance whose engine is up (its KV size; its event publisher, if any)."""
        self.index.set_capacity(info.instance_id, info.kv_blocks_total)
        if self.subscriber is None:
            return
        if info.kv_events_endpoint is None:
            logger.warning("instance %s publishes no KV events: its prefix hits come from the router's "
                           "placements only", info.instance_id)
            return
        self.subscriber.watch(info.instance_id, info.kv_events_endpoint, info.kv_events_replay_endpoint,
                              self.events.epoch(info.instance_id))

    def restarted(self, info: EngineInfo) -> None:
        """A new engine on the instance: what the old one cached is gone."""
        self.index.reset(info.instance_id)
        self.follow(info)

    def forget(self, instance_id: str) -> None:
        """The instance left the cluster: stop following it and drop what it held."""
        if self.subscriber is not None:
            self.subscriber.unwatch(instance_id)
        self.index.reset(instance_id)

    def keys(self, prompt_token_ids: Sequence[int], block_size: int) -> list[int]:
        return self.hasher.keys(prompt_token_ids, block_size)

    def lookup(self, keys: Sequence[int], instance_ids: Sequence[str], now: float) -> dict[str, int]:
        """Leading blocks of the prompt (its `keys`) each instance holds."""
        if not keys:
            return {}
        return self.index.matches(instance_ids, keys, now)

    def placed(self, placement: Placement, keys: Sequence[int], prefix: dict[str, int], prompt_tokens: int,
               block_size: int, roles: dict[str, Role], now: float) -> None:
        """Record a decision: both its instances will hold the prompt's blocks."""
        chosen = {placement.prefill, placement.decode}
        for iid in chosen:
            self.index.observe_placement(iid, keys, now)
            role = roles[iid].value
            held = max(0, min(prefix.get(iid, 0) * block_size, prompt_tokens - 1))
            self.tokens[role] = self.tokens.get(role, 0) + prompt_tokens
            self.hit_tokens[role] = self.hit_tokens.get(role, 0) + held

    def counters(self) -> dict[str, int]:
        out = dict(self.index.counters())
        if self.subscriber is not None:
            out.update({f"subscriber_{k}": v for k, v in self.subscriber.counters.items()})
        return out

    def close(self) -> None:
        if self.subscriber is not None:
            self.subscriber.close()
