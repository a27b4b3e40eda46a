"""The handshake across hosts: D's reservations reach the router over TCP, and TP ranks pair rank to rank."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import torch

from pdserve.kv_transfer import TransportConfig
from pdserve.kv_transfer.connector_meta import EndpointHandshake, LoadSpec, PDConnectorMetadata, SendSpec, TokenSpec
from pdserve.kv_transfer.connector_worker import PDWorkerSide
from pdserve.kv_transfer.errors import ProtocolError
from pdserve.kv_transfer.loopback import LoopbackFabric
from pdserve.kv_transfer.params import Reservation
from pdserve.kv_transfer.ports import NoFreePortError, listen, resolve_hosts
from pdserve.kv_transfer.reservations import ReservationInbox, ReservationPoster, split_host_port
from pdserve.shared.config import KVTransferConfig


def _reservation(tid: str = "t1") -> Reservation:
    return Reservation(tid, [{"instance_id": "decode-0", "address": "tcp://10.0.0.2:5000"}], [4, 5, 6], 40, 1)


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def inbox():
    box = ReservationInbox("127.0.0.1")
    box.start()
    yield box
    box.close()


async def test_a_posted_reservation_wakes_its_waiter_and_is_taken_once(inbox):
    poster = ReservationPoster()
    try:
        waiter = asyncio.create_task(inbox.wait("t1", 5.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        poster.post(inbox.address, _reservation())
        await asyncio.wait_for(waiter, 2.0)
        assert time.monotonic() - started < 1.0  # woken by the arrival, not by its timeout
        assert inbox.poll("t1") == _reservation()
        assert inbox.poll("t1") is None
        _wait_for(lambda: poster.counters["posted"] == 1)  # counted once the ack is back
        assert inbox.counters["received"] == 1
    finally:
        poster.close()


async def test_wait_returns_at_its_timeout_when_nothing_comes(inbox):
    started = time.monotonic()
    await inbox.wait("never", 0.1)
    assert 0.08 < time.monotonic() - started < 1.0 and inbox.poll("never") is None


def test_one_kept_connection_carries_many_reservations(inbox):
    poster = ReservationPoster()
    try:
        for i in range(50):
            poster.post(inbox.address, _reservation(f"t{i}"))
        _wait_for(lambda: poster.counters["posted"] == 50)
        assert all(inbox.poll(f"t{i}") is not None for i in range(50))
        assert len(poster._conns) == 1
    finally:
        poster.close()


def test_a_restarted_router_is_redialed_and_nothing_is_lost():
    first = ReservationInbox("127.0.0.1")
    first.start()
    port = split_host_port(first.address)[1]
    poster = ReservationPoster()
    try:
        poster.post(first.address, _reservation("a"))
        _wait_for(lambda: first.poll("a") is not None)
        first.close()
        time.sleep(0.7)  # the old inbox's connection threads notice and close the kept socket
        second = ReservationInbox("127.0.0.1", port_range=(port, port))
        second.start()
        try:
            poster.post(second.address, _reservation("b"))
            _wait_for(lambda: second.poll("b") is not None)
            assert poster.counters == {"posted": 2, "post_failed": 0}
        finally:
            second.close()
    finally:
        poster.close()


def test_an_unreachable_router_is_counted_not_raised_into_the_engine():
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    poster = ReservationPoster(connect_timeout_s=0.5, ack_timeout_s=0.5)
    try:
        poster.post(dead, _reservation())  # returns at once
        _wait_for(lambda: poster.counters["post_failed"] == 1)
    finally:
        poster.close()


def test_malformed_lines_get_an_error_and_the_connection_keeps_working(inbox):
    with socket.create_connection(split_host_port(inbox.address), timeout=2) as sock, sock.makefile("rb") as reader:
        sock.sendall(b"not json\n")
        assert "error" in json.loads(reader.readline())
        sock.sendall(json.dumps({"reservation": {"transfer_id": "x", "decode_block_ids": ["a"]}}).encode() + b"\n")
        assert "error" in json.loads(reader.readline())
        sock.sendall(json.dumps({"reservation": _reservation("ok").to_dict()}).encode() + b"\n")
        assert json.loads(reader.readline()) == "ok"
    assert inbox.counters["malformed"] == 2 and inbox.poll("ok") == _reservation("ok")


def test_a_duplicate_keeps_the_first_and_untaken_entries_expire():
    box = ReservationInbox("127.0.0.1", ttl_s=0.1)
    box.deliver(_reservation("a"))
    box.deliver(Reservation("a"))  # a re-sent copy: ignored
    assert box.counters["duplicates"] == 1
    time.sleep(0.15)
    box.deliver(_reservation("b"))  # arrivals sweep what nobody took
    assert box.poll("a") is None and box.poll("b") == _reservation("b") and box.counters["expired"] == 1


def test_addresses_parse_and_malformed_ones_are_typed():
    assert split_host_port("10.1.2.3:4100") == ("10.1.2.3", 4100)
    assert split_host_port("[::1]:4100") == ("::1", 4100)
    for bad in ("10.1.2.3", ":4100", "host:port"):
        with pytest.raises(ProtocolError):
            split_host_port(bad)


def test_listeners_take_the_first_free_port_of_the_range():
    first = listen("127.0.0.1", None)
    port = first.getsockname()[1]
    try:
        with pytest.raises(NoFreePortError):
            listen("127.0.0.1", (port, port))
        second = listen("127.0.0.1", (port, port + 1)) if port < 65535 else None
        if second is not None:
            assert second.getsockname()[1] == port + 1
            second.close()
    finally:
        first.close()


def test_hosts_default_to_the_node_address_and_advertise_it_when_binding_everything():
    assert resolve_hosts(KVTransferConfig(), "10.0.0.5").bind_host == "10.0.0.5"
    assert resolve_hosts(KVTransferConfig(), "10.0.0.5").advertise_host == "10.0.0.5"
    wide = resolve_hosts(KVTransferConfig(bind_host="0.0.0.0"), "10.0.0.5")
    assert (wide.bind_host, wide.advertise_host) == ("0.0.0.0", "10.0.0.5")
    nat = resolve_hosts(KVTransferConfig(bind_host="0.0.0.0", advertise_host="203.0.113.9"), "10.0.0.5")
    assert nat.advertise_host == "203.0.113.9"
    assert KVTransferConfig(port_range="20000-20099").port_range == (20000, 20099)
    for bad in ("20000", "9-2", [0, 10]):
        with pytest.raises(ValueError):
            KVTransferConfig(port_range=bad)


# -- tensor parallel: rank r of P pushes into rank r of D ----------------------------------------
BS, HEADS_PER_RANK, HD, LAYERS, NBLOCKS = 4, 2, 8, 2, 6


def _rank(name: str, rank: int, fabric: LoopbackFabric, seed: int) -> tuple[PDWorkerSide, list[torch.Tensor]]:
    side = PDWorkerSide(f"{name}-tp{rank}", "demo", BS, HD, 2, rank, "loopback", TransportConfig(),
                        transport_options={"fabric": fabric})
    g = torch.Generator().manual_seed(seed)
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(NBLOCKS, HEADS_PER_RANK, BS, 2 * HD, generator=g)
              for i in range(LAYERS)}
    side.register_kv_caches(caches)
    return side, list(caches.values())


def test_each_prefill_rank_fills_the_blocks_of_the_same_decode_rank():
    from pdserve.kv_transfer.connector import endpoints_by_rank

    fabric = LoopbackFabric()
    p = [_rank("prefill-0", r, fabric, seed=10 + r) for r in (0, 1)]
    d = [_rank("decode-0", r, fabric, seed=50 + r) for r in (0, 1)]
    try:
        # D's scheduler side learns every rank's endpoint and puts them, in rank order, in the reservation.
        handshakes = {r: EndpointHandshake(side.handshake_metadata().endpoint) for r, (side, _) in enumerate(d)}
        endpoints = endpoints_by_rank(handshakes, 2)
        assert [e["instance_id"] for e in endpoints] == ["decode-0-tp0", "decode-0-tp1"]
        assert endpoints_by_rank({0: handshakes[0]}, 2) is None  # a rank missing: no reservation at all
        for side, _ in d:  # vLLM hands every rank the same metadata
            side.bind(PDConnectorMetadata(loads=[LoadSpec("d1", "t1", [4, 1], 5.0)]))
        for side, _ in p:
            side.bind(PDConnectorMetadata(sends=[SendSpec("p1", "t1", endpoints, [2, 3], [4, 1], 5.0)]))
            for i in range(LAYERS):
                side.save_layer(f"model.layers.{i}.self_attn.attn")
            side.bind(PDConnectorMetadata(tokens=[TokenSpec("p1", [7])]))
        for side, _ in d:
            _wait_for(lambda side=side: side.transfer_results(set())[1] == {"d1"})
        for (_, p_caches), (_, d_caches) in zip(p, d):
            for layer in range(LAYERS):
                assert torch.equal(d_caches[layer][4], p_caches[layer][2])
                assert torch.equal(d_caches[layer][1], p_caches[layer][3])
    finally:
        for side, _ in p + d:
            side.shutdown()
