"""Which instance holds which prompt blocks: the prefix index behind prefix-aware routing.

Two implementations behind one interface (`PrefixIndex`):

- `EventIndex` (precise): fed by the engines' own KV-cache events (vLLM's
  `kv_events_config`: BlockStored, BlockRemoved, AllBlocksCleared), keyed by
  the engines' block hashes (`block_hash.block_key`).
- `SentIndex` (approximate): the router's own record of which prompts it sent
  where, each entry expiring after a TTL and bounded by the instance's KV
  size; used when events are off.

`OverlayIndex` reads both (an event index plus a short-lived record of
placements not yet confirmed by events, which arrive a step later).

The policies never see this: the controller asks `match()` for the request's
block keys and puts the count of leading blocks held, per instance, in the
snapshot (`InstanceSnapshot.prefix_blocks`).

Ordering of events (EventIndex): every event has a position (batch sequence
number, index inside the batch). Each block remembers the position of the
last event that touched it (a removed block leaves a bounded tombstone), and
an event older than what a block already saw is ignored; AllBlocksCleared
drops everything older than itself. So events applied out of order give the
state applying them in order would. An instance whose engine restarts (its
cache is gone) is `reset`: a new epoch, its blocks dropped, and events still
in flight from the old engine (older epoch) ignored. A publisher whose
sequence starts again on the live stream (`restart_sequence`) also drops it.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

# Removed blocks remembered per instance to order late stores against (the oldest go first).
_TOMBSTONES = 100_000
# Mediums whose blocks a prefix hit can use (None: vLLM left it unset, which means the device cache).
_DEVICE_MEDIUMS = (None, "GPU")


class EventKind(enum.Enum):
    STORED = "BlockStored"
    REMOVED = "BlockRemoved"
    CLEARED = "AllBlocksCleared"


@dataclass(frozen=True)
class KVEvent:
    """One KV-cache event of one engine, its block hashes already turned into index keys."""

    kind: EventKind
    keys: tuple[int, ...] = ()
    medium: str | None = None
    first_tokens: tuple[int, ...] | None = None  # a chain's first block (no parent): its tokens, for checks


class PrefixIndex(ABC):
    """Per instance: how many leading blocks of a prompt it holds in its prefix cache."""

    @abstractmethod
    def match(self, instance_id: str, keys: Sequence[int], now: float) -> int:
        """Leading blocks of `keys` (a prompt's block keys, in order) the instance holds."""

    def matches(self, instance_ids: Iterable[str], keys: Sequence[int], now: float) -> dict[str, int]:
        return {iid: self.match(iid, keys, now) for iid in instance_ids}

    def observe_placement(self, instance_id: str, keys: Sequence[int], now: float) -> None:
        """The router sent a prompt with these block keys to the instance (it will hold them)."""

    @abstractmethod
    def reset(self, instance_id: str) -> int:
        """The instance lost its cache (engine restart): forget it; returns its new epoch."""

    def set_capacity(self, instance_id: str, blocks: int) -> None:
        """The instance's KV size in blocks (what an approximate record may assume it keeps)."""

    def counters(self) -> dict[str, int]:
        return {}


@dataclass
class _Held:
    """One instance's blocks as its events describe them."""

    epoch: int = 0
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)  # key -> position of its store
    tombstones: OrderedDict = field(default_factory=OrderedDict)  # key -> position of its removal
    cleared_at: tuple[int, int] = (-1, -1)
    last_seq: int = -1


class EventIndex(PrefixIndex):
    """The precise index: blocks stored and removed, as each engine reported them."""

    def __init__(self, tombstones: int = _TOMBSTONES) -> None:
        self._lock = threading.Lock()  # events arrive on the subscriber's thread, lookups on the router's
        self._held: dict[str, _Held] = {}
        self._max_tombstones = tombstones
        self._counters = dict.fromkeys(
            ("events", "stale_epoch", "stale_events", "seq_gaps", "seq_restarts", "other_medium"), 0)

    def epoch(self, instance_id: str) -> int:
        with self._lock:
            return self._state(instance_id).epoch

    def _state(self, instance_id: str) -> _Held:
        held = self._held.get(instance_id)
        if held is None:
            held = self._held[instance_id] = _Held()
        return held

    def reset(self, instance_id: str) -> int:
        with self._lock:
            epoch = self._state(instance_id).epoch + 1
            self._held[instance_id] = _Held(epoch=epoch)
            return epoch

    def apply(self, instance_id: str, epoch: int, seq: int, events: Sequence[KVEvent]) -> None:
        """Apply one batch (sequence number `seq` of that engine's publisher) of events."""
        with self._lock:
            held = self._state(instance_id)
            if epoch != held.epoch:
                self._counters["stale_epoch"] += 1  # from an engine this instance no longer runs
                return
            self._check_seq(instance_id, held, seq)
            for i, event in enumerate(events):
                self._counters["events"] += 1
                self._apply_one(held, (seq, i), event)

    def restart_sequence(self, instance_id: str, epoch: int) -> None:
        """The engine's publisher began its sequence again (a new engine the controller did not restart).

        Only the subscriber can tell: its live stream is in order, so a number going back is a new
        publisher, whereas `apply` must accept late batches. The cache went with the old engine.
        """
        with self._lock:
            held = self._state(instance_id)
            if epoch == held.epoch:
                self._counters["seq_restarts"] += 1
                self._held[instance_id] = _Held(epoch=epoch)

    def _check_seq(self, instance_id: str, held: _Held, seq: int) -> None:
        if seq > held.last_seq + 1 and held.last_seq >= 0:
            self._counters["seq_gaps"] += 1  # batches lost or late: the subscriber asks for a replay
        held.last_seq = max(held.last_seq, seq)

    def _apply_one(self, held: _Held, pos: tuple[int, int], event: KVEvent) -> None:
        if event.kind is EventKind.CLEARED:
            if pos > held.cleared_at:
                held.cleared_at = pos
                held.blocks = {k: p for k, p in held.blocks.items() if p > pos}
                held.tombstones = OrderedDict((k, p) for k, p in held.tombstones.items() if p > pos)
            return
        if event.medium not in _DEVICE_MEDIUMS:
            self._counters["other_medium"] += 1  # an offload tier's copy: not a device-cache hit
            return
        if pos < held.cleared_at:
            self._counters["stale_events"] += 1
            return
        for key in event.keys:
            seen = max(held.blocks.get(key, (-1, -1)), held.tombstones.get(key, (-1, -1)))
            if pos < seen:
                self._counters["stale_events"] += 1  # a later event about this block was applied already
                continue
            if event.kind is EventKind.STORED:
                held.blocks[key] = pos
                held.tombstones.pop(key, None)
            else:
                held.blocks.pop(key, None)
                held.tombstones[key] = pos
                held.tombstones.move_to_end(key)
                if len(held.tombstones) > self._max_tombstones:
                    held.tombstones.popitem(last=False)

    def match(self, instance_id: str, keys: Sequence[int], now: float) -> int:
        with self._lock:
            held = self._held.get(instance_id)
            if held is None:
                return 0
            n = 0
            for key in keys:
                if key not in held.blocks:
                    break
                n += 1
            return n

    def num_blocks(self, instance_id: str) -> int:
        with self._lock:
            held = self._held.get(instance_id)
            return len(held.blocks) if held else 0

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)


class SentIndex(PrefixIndex):
    """The approximate index: prompts the router sent to each instance, kept for `ttl_s`.

    An instance's record holds at most its KV size in blocks, least recently
    sent first out, which is roughly what an LRU prefix cache keeps.
    """

    def __init__(self, ttl_s: float, default_capacity: int = 0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._default_capacity = default_capacity  # 0: unbounded until set_capacity
        self._lock = threading.Lock()
        self._sent: dict[str, OrderedDict] = {}  # instance -> key -> expiry, oldest touch first
        self._capacity: dict[str, int] = {}
        self._counters = {"recorded": 0, "expired": 0, "evicted": 0}

    def set_capacity(self, instance_id: str, blocks: int) -> None:
        with self._lock:
            self._capacity[instance_id] = blocks

    def observe_placement(self, instance_id: str, keys: Sequence[int], now: float) -> None:
        with self._lock:
            sent = self._sent.setdefault(instance_id, OrderedDict())
            expiry = now + self.ttl_s
            for key in keys:
                sent[key] = expiry
                sent.move_to_end(key)
            self._counters["recorded"] += len(keys)
            cap = self._capacity.get(instance_id, self._default_capacity)
            while cap > 0 and len(sent) > cap:
                sent.popitem(last=False)
                self._counters["evicted"] += 1

    def _expire(self, sent: OrderedDict, now: float) -> None:
        # Every entry lives ttl_s from its last touch and touches move it to the end: expiries ascend.
        while sent:
            key, expiry = next(iter(sent.items()))
            if expiry > now:
                return
            sent.popitem(last=False)
            self._counters["expired"] += 1

    def match(self, instance_id: str, keys: Sequence[int], now: float) -> int:
        with self._lock:
            sent = self._sent.get(instance_id)
            if not sent:
                return 0
            self._expire(sent, now)
            n = 0
            for key in keys:
                if key not in sent:
                    break
                n += 1
            return n

    def reset(self, instance_id: str) -> int:
        with self._lock:
            self._sent.pop(instance_id, None)
        return 0

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)


class OverlayIndex(PrefixIndex):
    """An event index plus a short record of placements its events have not confirmed yet.

    Events come a step after the blocks are computed; a burst of requests with
    one prefix would otherwise scatter before the first one's events land.
    """

    def __init__(self, events: EventIndex, pending: SentIndex) -> None:
        self.events, self.pending = events, pending

    def match(self, instance_id: str, keys: Sequence[int], now: float) -> int:
        return max(self.events.match(instance_id, keys, now), self.pending.match(instance_id, keys, now))

    def observe_placement(self, instance_id: str, keys: Sequence[int], now: float) -> None:
        self.pending.observe_placement(instance_id, keys, now)

    def reset(self, instance_id: str) -> int:
        self.pending.reset(instance_id)
        return self.events.reset(instance_id)

    def set_capacity(self, instance_id: str, blocks: int) -> None:
        self.pending.set_capacity(instance_id, blocks)

    def counters(self) -> dict[str, int]:
        return {**self.events.counters(), **{f"pending_{k}": v for k, v in self.pending.counters().items()}}
