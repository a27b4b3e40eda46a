"""The prefix index: vLLM-compatible block keys, events in and out of order, restarts, eviction, expiry."""

from __future__ import annotations

import itertools
import time

import pytest

from pdserve.router.block_hash import BlockHasher, HashAlgo, block_key
from pdserve.router.kv_events import KVEventSubscriber, MalformedEvent, parse_batch
from pdserve.router.prefix_index import EventIndex, EventKind, KVEvent, OverlayIndex, SentIndex

BS = 4
PROMPT = list(range(100, 118))  # 4 full blocks and 2 tokens


def stored(*keys):
    return KVEvent(EventKind.STORED, tuple(keys), "GPU")


def removed(*keys):
    return KVEvent(EventKind.REMOVED, tuple(keys), "GPU")


CLEARED = KVEvent(EventKind.CLEARED)


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_keys_match_vllm_block_hashes(algo):
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kcu

    fn = get_hash_fn_by_name(algo)
    kcu.init_none_hash(fn)
    parent, want = None, []
    for start in range(0, len(PROMPT) - BS + 1, BS):
        parent = kcu.hash_block_tokens(fn, parent, PROMPT[start:start + BS])
        want.append(block_key(kcu.maybe_convert_block_hash(parent)))
    assert BlockHasher(HashAlgo(algo)).keys(PROMPT, BS) == want
    assert len(want) == 4  # the partial last block has no hash
    assert BlockHasher(HashAlgo(algo), seed="other").keys(PROMPT, BS) != want


def test_block_key_agrees_for_int_and_bytes_hashes():
    raw = bytes(range(32))
    assert block_key(raw) == block_key(int.from_bytes(raw, "big") & ((1 << 64) - 1))


def keys():
    return BlockHasher().keys(PROMPT, BS)


def test_stored_prefix_counts_leading_blocks_only():
    k = keys()
    index = EventIndex()
    index.apply("d0", 0, 0, [stored(k[0], k[1], k[3])])  # block 2 missing: a hit stops there
    assert index.match("d0", k, 0) == 2
    assert index.match("d1", k, 0) == 0
    index.apply("d0", 0, 1, [stored(k[2])])
    assert index.match("d0", k, 0) == 4


def test_eviction_removes_blocks():
    k = keys()
    index = EventIndex()
    index.apply("d0", 0, 0, [stored(*k)])
    index.apply("d0", 0, 1, [removed(k[1])])
    assert index.match("d0", k, 0) == 1
    index.apply("d0", 0, 2, [CLEARED])
    assert index.match("d0", k, 0) == 0


EVENTS = [(0, [stored(1, 2, 3)]), (1, [removed(2)]), (2, [stored(2)]), (3, [removed(3), CLEARED, stored(1)]),
          (4, [stored(5)]), (5, [removed(5)])]


def held(index, iid="p0"):
    return {k for k in (1, 2, 3, 5) if index.match(iid, [k], 0)}


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(EVENTS))))[::37])
def test_out_of_order_batches_give_the_in_order_state(order):
    in_order = EventIndex()
    for seq, batch in EVENTS:
        in_order.apply("p0", 0, seq, batch)
    shuffled = EventIndex()
    for i in order:
        shuffled.apply("p0", 0, *EVENTS[i])
    assert held(in_order) == {1}
    assert held(shuffled) == held(in_order)


def test_late_store_after_removal_and_store_after_clear_within_a_batch():
    index = EventIndex()
    index.apply("p0", 0, 5, [removed(7)])
    index.apply("p0", 0, 4, [stored(7)])  # stored before it was removed: stays removed
    assert held(index) == set() and not index.match("p0", [7], 0)
    index.apply("p0", 0, 6, [CLEARED, stored(7)])
    assert index.match("p0", [7], 0) == 1
    assert index.counters()["stale_events"] == 1


def test_restart_loses_the_cache_and_ignores_the_old_engines_events():
    k = keys()
    index = EventIndex()
    index.apply("d0", 0, 0, [stored(*k)])
    epoch = index.reset("d0")
    assert epoch == 1 and index.match("d0", k, 0) == 0
    index.apply("d0", 0, 1, [stored(*k)])  # in flight from the dead engine
    assert index.match("d0", k, 0) == 0
    assert index.counters()["stale_epoch"] == 1
    index.apply("d0", epoch, 0, [stored(k[0])])
    assert index.match("d0", k, 0) == 1


def test_publisher_restarting_its_sequence_means_a_new_engine():
    index = EventIndex()
    for seq in range(3):
        index.apply("d0", 0, seq, [stored(seq + 10)])
    index.restart_sequence("d0", epoch=1)  # from a subscription of another epoch: no effect
    assert held_keys(index) == {10, 11, 12}
    index.restart_sequence("d0", epoch=0)
    index.apply("d0", 0, 0, [stored(99)])
    assert held_keys(index) == {99}
    assert index.counters()["seq_restarts"] == 1


def held_keys(index, iid="d0"):
    return {k for k in (10, 11, 12, 99) if index.match(iid, [k], 0)}


def test_other_mediums_are_not_device_hits_and_gaps_are_counted():
    index = EventIndex()
    index.apply("d0", 0, 0, [KVEvent(EventKind.STORED, (1,), "CPU")])
    index.apply("d0", 0, 3, [stored(2)])
    assert index.match("d0", [1], 0) == 0 and index.match("d0", [2], 0) == 1
    assert index.counters()["other_medium"] == 1 and index.counters()["seq_gaps"] == 1


def test_sent_index_expires_and_evicts_least_recent():
    index = SentIndex(ttl_s=10.0)
    index.set_capacity("d0", 3)
    index.observe_placement("d0", [1, 2], now=0.0)
    assert index.match("d0", [1, 2, 3], now=5.0) == 2
    assert index.match("d0", [1, 2], now=10.5) == 0  # expired
    index.observe_placement("d0", [1, 2], now=20.0)
    index.observe_placement("d0", [3, 4], now=21.0)  # 4 blocks for 3: the oldest (1) goes
    assert index.match("d0", [2, 3, 4], now=22.0) == 3
    assert index.match("d0", [1, 2], now=22.0) == 0
    assert index.counters()["evicted"] == 1
    index.reset("d0")
    assert index.match("d0", [3], now=22.0) == 0


def test_overlay_takes_the_longer_of_events_and_pending_placements():
    events = EventIndex()
    overlay = OverlayIndex(events, SentIndex(ttl_s=1.0))
    events.apply("d0", 0, 0, [stored(1)])
    overlay.observe_placement("d0", [1, 2, 3], now=0.0)
    assert overlay.match("d0", [1, 2, 3], now=0.5) == 3
    assert overlay.match("d0", [1, 2, 3], now=2.0) == 1
    overlay.reset("d0")
    assert overlay.match("d0", [1], now=2.0) == 0


def test_parse_batch_reads_vllm_wire_format():
    import msgspec
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    batch = KVEventBatch(ts=1.0, events=[
        BlockStored(block_hashes=[5, b"\x00" * 24 + b"\x00\x00\x00\x00\x00\x00\x00\x07"], parent_block_hash=None,
                    token_ids=[1, 2, 3, 4, 5, 6, 7, 8], block_size=4, lora_id=None, medium="GPU", lora_name=None),
        BlockRemoved(block_hashes=[5], medium="GPU"), AllBlocksCleared()])
    events = parse_batch(msgspec.msgpack.encode(batch))
    assert [e.kind for e in events] == [EventKind.STORED, EventKind.REMOVED, EventKind.CLEARED]
    assert events[0].keys == (5, 7) and events[0].first_tokens == (1, 2, 3, 4)
    with pytest.raises(MalformedEvent):
        parse_batch(b"\xc1")
    with pytest.raises(MalformedEvent):
        parse_batch(msgspec.msgpack.encode([1.0, [{"type": "Nope"}]]))


def _wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_subscriber_follows_vllms_zmq_publisher():
    """vLLM's own publisher on one side, our subscriber and index on the other."""
    from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher

    from pdserve.worker.kv_events import pick_endpoints

    ends = pick_endpoints("127.0.0.1")
    cfg = ends.vllm_config("d0")
    pub = ZmqEventPublisher(0, endpoint=cfg["endpoint"], replay_endpoint=cfg["replay_endpoint"])
    hasher = BlockHasher()
    index = EventIndex()
    sub = KVEventSubscriber(index, hasher, poll_timeout_s=0.02, recv_timeout_s=2.0)
    sub.start()
    try:
        sub.watch("d0", ends.endpoint, ends.replay_endpoint, index.epoch("d0"))
        raw = hasher.hash_blocks(PROMPT, BS)
        ints = [block_key(h) for h in raw]

        def event(i):
            return BlockStored(block_hashes=[ints[i]], parent_block_hash=ints[i - 1] if i else None,
                               token_ids=PROMPT[i * BS:(i + 1) * BS], block_size=BS, lora_id=None, medium="GPU",
                               lora_name=None)
        # A slow joiner misses what is published before its subscription lands: keep publishing block 0.
        assert _wait_for(lambda: pub.publish(KVEventBatch(ts=0.0, events=[event(0)])) or index.match(
            "d0", ints, 0) >= 1)
        for i in (1, 2, 3):
            pub.publish(KVEventBatch(ts=0.0, events=[event(i)]))
        assert _wait_for(lambda: index.match("d0", ints, 0) == 4)
        assert sub.counters["hash_checked"] >= 1 and sub.counters["hash_mismatch"] == 0
    finally:
        sub.close()
        pub.shutdown()


def test_subscriber_asks_for_a_replay_of_a_gap_and_applies_it():
    """A publisher we drive by hand: batch 1 is lost on the live stream and comes back by replay."""
    import msgspec
    import zmq

    from pdserve.worker.kv_events import pick_endpoints

    def batch(*keys):
        return msgspec.msgpack.encode([0.0, [{"type": "BlockStored", "block_hashes": list(keys),
                                              "parent_block_hash": 1, "token_ids": [], "block_size": BS,
                                              "medium": "GPU"}]])

    ends = pick_endpoints("127.0.0.1")
    ctx = zmq.Context()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub.bind(f"tcp://127.0.0.1:{ends.publish_port}")
    router.bind(f"tcp://127.0.0.1:{ends.replay_port}")
    router.setsockopt(zmq.RCVTIMEO, 5000)
    index = EventIndex()
    sub = KVEventSubscriber(index, poll_timeout_s=0.02, recv_timeout_s=2.0)
    sub.start()
    try:
        sub.watch("d0", ends.endpoint, ends.replay_endpoint, 0)
        seq = (0).to_bytes(8, "big")
        assert _wait_for(lambda: pub.send_multipart((b"", seq, batch(11))) or index.match("d0", [11], 0) == 1)
        pub.send_multipart((b"", (2).to_bytes(8, "big"), batch(13)))
        ident, empty, start = router.recv_multipart()
        assert empty == b"" and int.from_bytes(start, "big") == 1
        router.send_multipart((ident, b"", b"", (1).to_bytes(8, "big"), batch(12)))
        router.send_multipart((ident, b"", b"", (-1).to_bytes(8, "big", signed=True), b""))
        assert _wait_for(lambda: index.match("d0", [11, 12, 13], 0) == 3)
        assert sub.counters["replays"] == 1 and index.counters()["seq_gaps"] == 1
    finally:
        sub.close()
        pub.close(linger=0)
        router.close(linger=0)
        ctx.term()
