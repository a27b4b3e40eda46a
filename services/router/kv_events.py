"""The controller's subscription to every engine's KV-cache events (vLLM's ZMQ publisher).

Lifecycle:
  watch(instance, endpoint, replay) -> a SUB socket (and a DEALER for
  replays) opened on the subscriber's thread -> batches decoded and applied
  to the `EventIndex` under the instance's current epoch -> a sequence gap
  asks the engine's replay endpoint for the missing batches -> unwatch (or a
  restart: `watch` again with the new engine's endpoint, after the index was
  reset) closes the sockets -> close() ends the thread.

vLLM's wire format (`vllm/distributed/kv_events.py`): multipart (topic,
8-byte big-endian sequence number, msgpack `KVEventBatch`); a batch is
`[ts, [event, ...], dp_rank]` and an event a map tagged by `type`
(BlockStored, BlockRemoved, AllBlocksCleared). Decoded here without vLLM.

One thread serves every socket through one poller whose wait has a timeout,
so commands (watch, unwatch, close) are picked up within `poll_timeout_s`;
ZMQ sockets are only ever touched on that thread. Malformed messages are
counted and logged, never applied.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from pdserve.router.block_hash import BlockHasher, block_key
from pdserve.router.prefix_index import EventIndex, EventKind, KVEvent

logger = logging.getLogger(__name__)

_END_SEQ = -1  # vLLM's replay answer ends with this sequence number


class MalformedEvent(ValueError):
    """A message that is not a vLLM KV event batch."""


def parse_batch(payload: bytes) -> list[KVEvent]:
    """A msgpack KVEventBatch as our events; raises MalformedEvent."""
    import msgspec

    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"not msgpack: {exc}") from exc
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise MalformedEvent(f"not an event batch: {type(batch).__name__}")
    out = []
    for raw in batch[1]:
        if not isinstance(raw, dict) or "type" not in raw:
            raise MalformedEvent(f"not a tagged event: {raw!r:.80}")
        try:
            kind = EventKind(raw["type"])
        except ValueError:
            raise MalformedEvent(f"unknown event type {raw['type']!r}") from None
        if raw.get("group_idx") not in (None, 0):
            continue  # another KV-cache group (hybrid models): the prompt's attention blocks are group 0
        keys = tuple(block_key(h) for h in raw.get("block_hashes") or ())
        first = None
        if kind is EventKind.STORED and raw.get("parent_block_hash") is None and keys:
            # A chain's first block: its tokens let the router check it hashes like the engine.
            size = raw.get("block_size") or 0
            first = tuple(raw.get("token_ids") or ())[:size] if size else None
        out.append(KVEvent(kind, keys, raw.get("medium"), first))
    return out


@dataclass
class _Watch:
    instance_id: str
    epoch: int
    endpoint: str
    replay_endpoint: str | None
    sub: Any = None
    replay: Any = None
    last_seq: int = -1
    replay_asked_at: float | None = None  # monotonic time of the unanswered replay request


class KVEventSubscriber:
    """Applies every watched engine's KV events to an `EventIndex`, on a thread of its own."""

    def __init__(self, index: EventIndex, hasher: BlockHasher | None = None, poll_timeout_s: float = 0.1,
                 recv_timeout_s: float = 5.0) -> None:
        self.index = index
        self.hasher = hasher  # checks first blocks' hashes against the router's own (a config mismatch is loud)
        self.poll_timeout_s = poll_timeout_s
        self.recv_timeout_s = recv_timeout_s  # a replay request's answer must come within this
        self.counters = dict.fromkeys(("batches", "malformed", "replays", "replay_failed", "hash_checked",
                                       "hash_mismatch"), 0)
        self._commands: queue.Queue = queue.Queue()
        self._watches: dict[str, _Watch] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        import zmq

        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-events", daemon=True)
        self._thread.start()

    def watch(self, instance_id: str, endpoint: str, replay_endpoint: str | None, epoch: int) -> None:
        """Follow an engine's events (replacing any earlier subscription of that instance)."""
        self._commands.put(("watch", _Watch(instance_id, epoch, endpoint, replay_endpoint)))

    def unwatch(self, instance_id: str) -> None:
        self._commands.put(("unwatch", instance_id))

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("KV event subscriber did not stop within %.1f s", timeout_s)

    # -- the subscriber's thread ----------------------------------------------------------
    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                self._take_commands(poller)
                ready = dict(poller.poll(int(self.poll_timeout_s * 1000)))
                for watch in list(self._watches.values()):
                    if watch.sub in ready:
                        self._drain(watch)
                    if watch.replay is not None and watch.replay in ready:
                        self._take_replay(watch)
        except Exception:  # noqa: BLE001 - a dead subscriber must be loud: the index goes stale
            logger.exception("KV event subscriber failed; the prefix index no longer follows the engines")
            raise
        finally:
            for watch in self._watches.values():
                self._close(poller, watch)
            self._ctx.term()

    def _take_commands(self, poller: Any) -> None:
        while True:
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "unwatch":
                old = self._watches.pop(arg, None)
                if old is not None:
                    self._close(poller, old)
                continue
            old = self._watches.pop(arg.instance_id, None)
            if old is not None:
                self._close(poller, old)
            self._open(poller, arg)

    def _open(self, poller: Any, watch: _Watch) -> None:
        import zmq

        watch.sub = self._ctx.socket(zmq.SUB)
        watch.sub.setsockopt(zmq.LINGER, 0)
        watch.sub.setsockopt(zmq.SUBSCRIBE, b"")
        watch.sub.connect(watch.endpoint)
        poller.register(watch.sub, zmq.POLLIN)
        if watch.replay_endpoint:
            watch.replay = self._ctx.socket(zmq.DEALER)
            watch.replay.setsockopt(zmq.LINGER, 0)
            watch.replay.setsockopt(zmq.SNDTIMEO, int(self.recv_timeout_s * 1000))
            watch.replay.connect(watch.replay_endpoint)
            poller.register(watch.replay, zmq.POLLIN)
        self._watches[watch.instance_id] = watch
        logger.info("following KV events of %s at %s (epoch %d)", watch.instance_id, watch.endpoint, watch.epoch)

    @staticmethod
    def _close(poller: Any, watch: _Watch) -> None:
        for sock in (watch.sub, watch.replay):
            if sock is not None:
                poller.unregister(sock)
                sock.close(linger=0)

    def _drain(self, watch: _Watch) -> None:
        import zmq

        while True:
            try:
                frames = watch.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            seq = self._sequence(frames)
            if seq is not None and seq <= watch.last_seq:
                # The live stream is in order: going back means a new publisher (engine) at this endpoint.
                logger.warning("KV events of %s restarted at %d after %d: its cache is gone",
                               watch.instance_id, seq, watch.last_seq)
                self.index.restart_sequence(watch.instance_id, watch.epoch)
                watch.last_seq = -1
            if self._apply(watch, frames) is None:
                continue
            if watch.last_seq >= 0 and seq > watch.last_seq + 1:
                self._ask_replay(watch, watch.last_seq + 1)
            watch.last_seq = seq

    @staticmethod
    def _sequence(frames: list[bytes]) -> int | None:
        if len(frames) != 3 or len(frames[1]) != 8:
            return None
        return int.from_bytes(frames[1], "big", signed=True)

    def _apply(self, watch: _Watch, frames: list[bytes]) -> int | None:
        """Apply one (topic, seq, payload) message; its sequence number, or None if malformed."""
        seq = self._sequence(frames)
        if seq is None:
            self._malformed(watch, f"{len(frames)} frames")
            return None
        try:
            events = parse_batch(frames[2])
        except MalformedEvent as exc:
            self._malformed(watch, str(exc))
            return None
        self.counters["batches"] += 1
        if self.hasher is not None:
            self._check_hashes(watch, events)
        self.index.apply(watch.instance_id, watch.epoch, seq, events)
        return seq

    def _check_hashes(self, watch: _Watch, events: list[KVEvent]) -> None:
        for event in events:
            if event.first_tokens is None:
                continue
            self.counters["hash_checked"] += 1
            if self.hasher.first_block_key(event.first_tokens) != event.keys[0]:
                self.counters["hash_mismatch"] += 1
                if self.counters["hash_mismatch"] == 1:  # once: every prompt would say the same
                    logger.error("KV events of %s hash blocks differently from the router (hash algorithm "
                                 "or seed differ, e.g. PYTHONHASHSEED): prefix hits will not be found",
                                 watch.instance_id)

    def _malformed(self, watch: _Watch, why: str) -> None:
        self.counters["malformed"] += 1
        logger.warning("malformed KV event message from %s: %s", watch.instance_id, why)

    def _ask_replay(self, watch: _Watch, start: int) -> None:
        import zmq

        if watch.replay is None:
            return  # no replay endpoint: the gap stays (counted by the index) until blocks are re-stored
        now = time.monotonic()
        if watch.replay_asked_at is not None:
            if now - watch.replay_asked_at < self.recv_timeout_s:
                return  # the replay asked for already covers this gap
            self.counters["replay_failed"] += 1  # never answered: ask again
            logger.warning("replay request to %s unanswered for %.1f s", watch.instance_id, self.recv_timeout_s)
        try:
            watch.replay.send_multipart((b"", start.to_bytes(8, "big")))
        except zmq.ZMQError as exc:
            self.counters["replay_failed"] += 1
            logger.warning("replay request to %s failed: %s", watch.instance_id, exc)
            return
        self.counters["replays"] += 1
        watch.replay_asked_at = now

    def _take_replay(self, watch: _Watch) -> None:
        """Replayed batches, as (empty, topic, seq, payload); the index orders them by seq."""
        import zmq

        while True:
            try:
                frames = watch.replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            body = frames[1:] if frames and frames[0] == b"" else frames
            if len(body) == 3 and int.from_bytes(body[1], "big", signed=True) == _END_SEQ:
                watch.replay_asked_at = None
                continue
            self._apply(watch, body)
