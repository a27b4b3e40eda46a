"""The P/D connector's logic without an engine: block copies, params, metadata, results.

The engine-facing parts are driven with small fakes of what vLLM hands the
connector (requests, block tables, scheduler outputs); the worker side runs
over the loopback transport, so sends, receives, failures and aborts are real
transfers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from pdserve.kv_transfer import FaultPlan, TransportConfig
from pdserve.kv_transfer.blocks import blocks_for_tokens, gather, scatter, wrap_layer
from pdserve.kv_transfer.connector_meta import PDConnectorMetadata, TokenSpec
from pdserve.kv_transfer.params import DecodeParams, ParamsError, PrefillParams, Reservation
from pdserve.kv_transfer.connector_scheduler import PDSchedulerSide
from pdserve.kv_transfer.connector_worker import PDWorkerSide, detect_order
from pdserve.kv_transfer.first_token import FIRST_TOKENS
from pdserve.kv_transfer.errors import BlockSetError, TransferTimeout
from pdserve.kv_transfer.loopback import LoopbackFabric

BS, HEADS, HD, LAYERS, NBLOCKS = 4, 2, 8, 3, 10


def cpu_kv(seed: int = 0) -> torch.Tensor:
    """A layer in vLLM's CPU order: [blocks, kv heads, block_size, 2 * head_dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NBLOCKS, HEADS, BS, 2 * HD, generator=g)


# -- block gathering and scattering --------------------------------------------------------
def test_cpu_order_gather_matches_the_backends_key_value_split() -> None:
    kv = cpu_kv()
    paged = wrap_layer(kv, "cpu", BS, HEADS, HD)
    out = gather(paged, [7, 2])
    assert out.shape == (2, 2, BS, HEADS, HD) and out.is_contiguous()
    # The CPU backend views a block as [heads, 2 * block_size, head_dim] and splits it: K first, then V.
    key_cache, value_cache = kv.view(NBLOCKS, HEADS, 2 * BS, HD).chunk(2, dim=2)
    for i, block in enumerate([7, 2]):
        assert torch.equal(out[i, 0], key_cache[block].permute(1, 0, 2))
        assert torch.equal(out[i, 1], value_cache[block].permute(1, 0, 2))


def test_scatter_inverts_gather_into_other_blocks_only() -> None:
    src, dst = cpu_kv(1), torch.zeros(NBLOCKS, HEADS, BS, 2 * HD)
    data = gather(wrap_layer(src, "cpu", BS, HEADS, HD), [1, 5, 6])
    scatter(wrap_layer(dst, "cpu", BS, HEADS, HD), [9, 0, 3], data)
    for s, d in [(1, 9), (5, 0), (6, 3)]:
        assert torch.equal(dst[d], src[s])
    untouched = [b for b in range(NBLOCKS) if b not in (9, 0, 3)]
    assert not dst[untouched].any()


def test_kv_first_order_round_trips_to_cpu_order() -> None:
    """A flash-style GPU layout and the CPU layout exchange the same wire bytes."""
    cpu = cpu_kv(2)
    wire = gather(wrap_layer(cpu, "cpu", BS, HEADS, HD), [4, 8])
    gpu = torch.zeros(2, NBLOCKS, BS, HEADS, HD)
    scatter(wrap_layer(gpu, "kv_first", BS, HEADS, HD), [0, 1], wire)
    key_cache, value_cache = cpu.view(NBLOCKS, HEADS, 2 * BS, HD).chunk(2, dim=2)
    assert torch.equal(gpu[0, 1], key_cache[8].permute(1, 0, 2))
    assert torch.equal(gpu[1, 0], value_cache[4].permute(1, 0, 2))


def test_block_copies_refuse_bad_ids_and_shapes() -> None:
    paged = wrap_layer(cpu_kv(), "cpu", BS, HEADS, HD)
    with pytest.raises(BlockSetError):
        gather(paged, [NBLOCKS])
    with pytest.raises(BlockSetError):
        scatter(paged, [0, 1], torch.zeros(1, 2, BS, HEADS, HD))
    with pytest.raises(BlockSetError):
        wrap_layer(cpu_kv(), "cpu", BS + 1, HEADS, HD)
    with pytest.raises(BlockSetError):
        detect_order(torch.zeros(3, 3), HD)
    assert detect_order(cpu_kv(), HD) == "cpu"
    assert blocks_for_tokens(0, 4) == 0 and blocks_for_tokens(4, 4) == 1 and blocks_for_tokens(5, 4) == 2


# -- params ----------------------------------------------------------------
def test_params_round_trip_and_malformed_params_are_typed() -> None:
    params = DecodeParams("t1", "10.0.0.7:4100", 5.0)
    assert DecodeParams.parse(params.to_dict()) == params
    assert DecodeParams.parse({"other": 1}) is None and PrefillParams.parse(None) is None
    endpoints = [{"instance_id": "d-tp0"}, {"instance_id": "d-tp1"}]
    reservation = Reservation("t1", endpoints, [3, 4], 7, 1)
    assert Reservation.from_dict(reservation.to_dict()) == reservation
    assert PrefillParams.parse(reservation.prefill_params()) == PrefillParams("t1", endpoints, [3, 4], 7, 1)
    with pytest.raises(ParamsError):
        DecodeParams.parse({"pd_remote_prefill": True})
    with pytest.raises(ParamsError):
        DecodeParams.parse({"pd_remote_prefill": True, "transfer_id": "t", "reply_to": 7})
    with pytest.raises(ParamsError):
        PrefillParams.parse({**reservation.prefill_params(), "decode_block_ids": [-1]})
    with pytest.raises(ParamsError):
        PrefillParams.parse({**reservation.prefill_params(), "decode_endpoints": {"instance_id": "d"}})
    with pytest.raises(ParamsError):
        Reservation.from_dict({**reservation.to_dict(), "num_tokens": True})


# -- scheduler side ----------------------------------------------------------------------
@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None
    status: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(name="FINISHED_LENGTH_CAPPED"))
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)


class FakeBlocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


class MemoryPoster:
    """Records what D's scheduler side posts, and to whom."""

    def __init__(self) -> None:
        self.posted: list[Reservation] = []
        self.addresses: list[str] = []

    def post(self, reply_to: str, reservation: Reservation) -> None:
        self.addresses.append(reply_to)
        self.posted.append(reservation)


def sched_output(new: list[tuple[str, int]] = (), scheduled: dict[str, int] | None = None) -> SimpleNamespace:
    return SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c) for r, c in new],
                           num_scheduled_tokens=scheduled or {})


REPLY_TO = "127.0.0.1:4100"


def decode_side() -> tuple[PDSchedulerSide, MemoryPoster]:
    poster = MemoryPoster()
    side = PDSchedulerSide(block_size=BS, poster=poster, transfer_timeout_s=9.0)
    side.endpoints = [{"instance_id": "decode-0"}]
    return side, poster


def test_decode_reserves_all_but_the_last_token_and_posts_a_reservation() -> None:
    side, poster = decode_side()
    req = FakeRequest("r1", list(range(10)), DecodeParams("t1", REPLY_TO).to_dict())
    assert side.get_num_new_matched_tokens(req, 0) == (9, True)
    side.update_state_after_alloc(req, FakeBlocks([5, 6, 7]), 9)
    side.update_state_after_alloc(req, FakeBlocks([5, 6, 7, 8]), 0)  # second call after the load: ignored
    meta = side.build_connector_meta(sched_output())
    assert [(load.req_id, load.transfer_id, load.block_ids, load.timeout_s) for load in meta.loads] == [
        ("r1", "t1", [5, 6, 7], 9.0)]
    assert poster.posted == [Reservation("t1", [{"instance_id": "decode-0"}], [5, 6, 7], 9, 0)]
    assert side.build_connector_meta(sched_output()).loads == []  # metadata is per step
    # After a failed load vLLM asks again: the answer is "recompute".
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)


def test_decode_without_kv_room_is_asked_again_and_reserves_when_it_allocates() -> None:
    side, poster = decode_side()
    req = FakeRequest("r1", list(range(10)), DecodeParams("t1", REPLY_TO).to_dict())
    assert side.get_num_new_matched_tokens(req, 0) == (9, True)
    # No room this step: vLLM does not allocate and asks again on a later one.
    assert poster.posted == []
    assert side.get_num_new_matched_tokens(req, 0) == (9, True)  # still a remote prefill, not a local one
    side.update_state_after_alloc(req, FakeBlocks([4, 2, 9]), 9)
    assert poster.posted == [Reservation("t1", [{"instance_id": "decode-0"}], [4, 2, 9], 9, 0)]
    assert [load.block_ids for load in side.build_connector_meta(sched_output()).loads] == [[4, 2, 9]]


def test_decode_skips_its_own_prefix_hit_blocks() -> None:
    side, poster = decode_side()
    req = FakeRequest("r1", list(range(14)), DecodeParams("t1", REPLY_TO).to_dict())
    assert side.get_num_new_matched_tokens(req, 8) == (5, True)
    side.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 5)
    assert poster.posted[0].decode_block_ids == [3, 4] and poster.posted[0].first_block == 2


def test_decode_with_nothing_to_load_posts_an_empty_reservation() -> None:
    side, poster = decode_side()
    req = FakeRequest("r1", [42], DecodeParams("t1", REPLY_TO).to_dict())
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    assert poster.posted == [Reservation("t1")] and poster.addresses == [REPLY_TO]  # empty: no transfer


def test_decode_abort_while_waiting_aborts_the_load_and_frees_at_once() -> None:
    side, _ = decode_side()
    req = FakeRequest("r1", list(range(10)), DecodeParams("t1", REPLY_TO).to_dict())
    side.get_num_new_matched_tokens(req, 0)
    side.update_state_after_alloc(req, FakeBlocks([5, 6, 7]), 9)
    side.build_connector_meta(sched_output())
    req.status = SimpleNamespace(name="FINISHED_ABORTED")
    assert side.request_finished(req, [5, 6, 7]) == (False, None)
    assert side.has_pending_push_work()  # the abort must reach the worker in a step
    assert side.build_connector_meta(sched_output()).abort_loads == ["r1"]


class FakeManager:
    def __init__(self, tables: dict[str, list[int]]) -> None:
        self.tables = tables

    def get_block_ids(self, rid: str) -> tuple[list[int], ...]:
        return (self.tables[rid],)


def test_prefill_sends_in_the_step_that_completes_the_prompt_and_holds_blocks() -> None:
    side = PDSchedulerSide(block_size=BS, poster=None, transfer_timeout_s=9.0)
    side.kv_cache_manager = FakeManager({"p1": [20, 21, 22]})
    params = Reservation("t1", [{"instance_id": "decode-0"}], [5, 6, 7], 9).prefill_params()
    req = FakeRequest("p1", list(range(10)), params, output_token_ids=[42])
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    # Chunked prefill: 6 tokens, then the remaining 4.
    assert side.build_connector_meta(sched_output([("p1", 0)], {"p1": 6})).sends == []
    req.num_computed_tokens = 6  # vLLM advances it after building the metadata
    sends = side.build_connector_meta(sched_output([], {"p1": 4})).sends
    assert [(s.transfer_id, s.local_block_ids, s.remote_block_ids) for s in sends] == [("t1", [20, 21, 22], [5, 6, 7])]
    assert side.request_finished(req, [20, 21, 22]) == (True, None)
    assert side.has_pending_push_work()
    # The token P sampled follows the KV, in the next step's instructions.
    assert [(t.req_id, t.token_ids) for t in side.build_connector_meta(sched_output([], {})).tokens] == [("p1", [42])]
    side.update_connector_output(SimpleNamespace(finished_sending={"p1"}))
    assert not side.has_pending_push_work()


def test_prefill_aborted_before_its_last_chunk_frees_at_once() -> None:
    side = PDSchedulerSide(block_size=BS, poster=None, transfer_timeout_s=9.0)
    side.kv_cache_manager = FakeManager({"p1": [20, 21, 22]})
    req = FakeRequest("p1", list(range(10)), Reservation("t1", [{}], [5, 6, 7], 9).prefill_params())
    side.get_num_new_matched_tokens(req, 0)
    side.build_connector_meta(sched_output([("p1", 0)], {"p1": 4}))
    req.status = SimpleNamespace(name="FINISHED_ABORTED")
    assert side.request_finished(req, [20, 21, 22]) == (False, None)


# -- worker side over the loopback transport -----------------------------------------------
def worker(name: str, fabric: LoopbackFabric, seed: int, timeout: float = 5.0) -> tuple[PDWorkerSide, list]:
    side = PDWorkerSide(name, "demo", BS, HD, 1, 0, "loopback", TransportConfig(transfer_timeout_s=timeout),
                        transport_options={"fabric": fabric})
    caches = {f"model.layers.{i}.self_attn.attn": cpu_kv(seed + i) for i in range(LAYERS)}
    side.register_kv_caches(caches)
    return side, list(caches.values())


def wait_results(side: PDWorkerSide, finished: set[str], want: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sending, recving, failed = side.transfer_results(finished)
        if (want == "send" and sending) or (want == "recv" and recving):
            return sending, recving, failed
        time.sleep(0.01)
    raise AssertionError(f"no {want} result within {timeout}s")


def _load_and_send(fabric: LoopbackFabric, timeout: float = 5.0):
    from pdserve.kv_transfer.connector_meta import LoadSpec, SendSpec
    p, p_caches = worker("prefill-0", fabric, seed=10, timeout=timeout)
    d, d_caches = worker("decode-0", fabric, seed=50, timeout=timeout)
    d.bind(PDConnectorMetadata(loads=[LoadSpec("d1", "t1", [8, 3], timeout)]))
    p.bind(PDConnectorMetadata(sends=[SendSpec("p1", "t1", [d.transport.endpoint.to_dict()], [1, 2], [8, 3], timeout)]))
    return p, p_caches, d, d_caches


def test_layers_sent_during_the_forward_land_in_the_reserved_blocks() -> None:
    p, p_caches, d, d_caches = _load_and_send(LoopbackFabric())
    try:
        for i in range(LAYERS):
            p.save_layer(f"model.layers.{i}.self_attn.attn")
        time.sleep(0.2)
        assert d.transfer_results(set())[1] == set()  # every layer is there, P's token is not yet
        p.bind(PDConnectorMetadata(tokens=[TokenSpec("p1", [42])]))  # P's next step: its sampled token
        _, recving, failed = wait_results(d, set(), "recv")
        assert recving == {"d1"} and failed == set()
        assert FIRST_TOKENS.get("t1") == 42  # D's sampler continues from it
        for i in range(LAYERS):
            assert torch.equal(d_caches[i][8], p_caches[i][1]) and torch.equal(d_caches[i][3], p_caches[i][2])
        # P reports the send only once vLLM has finished the request.
        assert p.transfer_results(set())[0] == set()
        sending, _, _ = wait_results(p, {"p1"}, "send")
        assert sending == {"p1"}
        assert p.take_counters()["send_done"] == 1 and d.take_counters() == {"recv_done": 1}
    finally:
        p.shutdown()
        d.shutdown()


def test_a_broken_link_reports_the_load_failed_and_the_blocks_untouched() -> None:
    p, _, d, d_caches = _load_and_send(LoopbackFabric(FaultPlan(break_at_layer=1)))
    before = [c.clone() for c in d_caches]
    try:
        for i in range(LAYERS):
            p.save_layer(f"model.layers.{i}.self_attn.attn")
        _, recving, failed = wait_results(d, set(), "recv")
        assert recving == {"d1"} and failed == {"d1"}  # finished *and* failed: vLLM recomputes
        assert all(torch.equal(a, b) for a, b in zip(before, d_caches))
        assert d.take_counters() == {"recv_failed": 1}
        sending, _, _ = wait_results(p, {"p1"}, "send")
        assert sending == {"p1"} and p.take_counters().get("send_failed") == 1
    finally:
        p.shutdown()
        d.shutdown()


def test_a_load_that_times_out_is_reported_failed() -> None:
    from pdserve.kv_transfer.connector_meta import LoadSpec
    d, _ = worker("decode-0", LoopbackFabric(), seed=0, timeout=0.2)
    try:
        d.bind(PDConnectorMetadata(loads=[LoadSpec("d1", "t1", [1], 0.2)]))
        _, recving, failed = wait_results(d, set(), "recv")
        assert recving == failed == {"d1"}
    finally:
        d.shutdown()


def test_an_unreachable_decode_fails_the_send_but_still_frees_prefill_blocks() -> None:
    from pdserve.kv_transfer.connector_meta import SendSpec
    p, _ = worker("prefill-0", LoopbackFabric(), seed=0)
    try:
        ghost = {**p.transport.endpoint.to_dict(), "instance_id": "decode-9", "address": "loopback://nowhere/0"}
        p.bind(PDConnectorMetadata(sends=[SendSpec("p1", "t1", [ghost], [1], [1], 1.0)]))
        p.save_layer("model.layers.0.self_attn.attn")  # no sender: nothing to do, no error
        assert p.transfer_results({"p1"})[0] == {"p1"}
    finally:
        p.shutdown()


def test_aborting_a_load_stops_it_and_reports_it_finished_without_copying() -> None:
    p, _, d, d_caches = _load_and_send(LoopbackFabric())
    before = [c.clone() for c in d_caches]
    try:
        d.bind(PDConnectorMetadata(abort_loads=["d1"]))
        # vLLM frees an aborted waiting request's blocks once its receive is reported finished.
        assert d.transfer_results(set()) == (set(), {"d1"}, set())
        assert d.transfer_results(set()) == (set(), set(), set())
        assert d.take_counters() == {"recv_aborted": 1}
        p.save_layer("model.layers.0.self_attn.attn")
        sending, _, _ = wait_results(p, {"p1"}, "send")  # P learns of the abort and lets go of its blocks
        assert sending == {"p1"} and p.take_counters().get("send_failed") == 1
        assert all(torch.equal(a, b) for a, b in zip(before, d_caches))
    finally:
        p.shutdown()
        d.shutdown()
