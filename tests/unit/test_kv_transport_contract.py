"""One contract suite for every KV transport this machine can run.

Each test runs against loopback (in-process, fault injection), tcp and gloo;
nccl joins where two CUDA devices exist. Both ends live in this process, on
the transports' own threads (gloo builds two independent two-rank groups).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from pdserve.kv_transfer import (BlockSetError, EndpointInfo, EndpointRegistry, FaultPlan, HandshakeError, KVLayout,
                                 PeerLostError, TransferAborted, TransferError, TransferState, TransferTimeout,
                                 TransportConfig, make_transport)
from pdserve.kv_transfer.loopback import LoopbackFabric
from pdserve.kv_transfer.transport import LinkTransport

LAYOUT = KVLayout(model="demo", dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=4, head_dim=32)
CONFIG = TransportConfig(connect_timeout_s=10, transfer_timeout_s=10)


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


KINDS = [
    "loopback", "tcp", "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(not _two_gpus(), reason="NCCL pairs need two CUDA devices")),
]


@dataclass
class Pair:
    kind: str
    prefill: LinkTransport
    decode: LinkTransport
    registry: EndpointRegistry
    fabric: LoopbackFabric
    ended: dict[str, list[TransferState]] = field(default_factory=dict)

    def watch(self, name: str, transfer) -> None:
        """Record every done-callback call, to check the owner is told exactly once."""
        calls = self.ended.setdefault(name, [])
        transfer.add_done_callback(calls.append)

    def kill_decode(self) -> None:
        """The decode instance dies: its pipes break with no goodbye."""
        if self.kind == "loopback":
            self.fabric.kill(self.decode.endpoint.address)
            return
        for link in list(self.decode._inbound):
            link.channel.close()


def _make(kind: str, instance_id: str, layout: KVLayout, registry: EndpointRegistry, fabric: LoopbackFabric,
          config: TransportConfig, device: int) -> LinkTransport:
    transport = make_transport(kind, instance_id, layout, registry, config, fabric=fabric, device=device)
    transport.start()
    return transport  # type: ignore[return-value]


@pytest.fixture
def make_pair() -> Iterator:
    made: list[Pair] = []

    def build(kind: str, decode_layout: KVLayout = LAYOUT, faults: FaultPlan | None = None,
              config: TransportConfig = CONFIG) -> Pair:
        registry, fabric = EndpointRegistry(), LoopbackFabric(faults)
        pair = Pair(kind, _make(kind, "prefill-0", LAYOUT, registry, fabric, config, 0),
                    _make(kind, "decode-0", decode_layout, registry, fabric, config, 1), registry, fabric)
        made.append(pair)
        return pair

    yield build
    for pair in made:
        # No transfer may outlive its end: a lingering entry is a leaked block set.
        deadline = time.monotonic() + 2
        while (pair.prefill._senders or pair.decode._receivers) and time.monotonic() < deadline:
            time.sleep(0.01)
        leaked = [*pair.prefill._senders, *pair.decode._receivers]
        pair.prefill.close()
        pair.decode.close()
        assert not leaked, f"transfers never ended: {leaked}"
        for calls in pair.ended.values():
            assert len(calls) == 1, f"done callback ran {len(calls)} times: {calls}"


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _layers(transport: LinkTransport, num_blocks: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = LAYOUT.block_set_shape(num_blocks)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16).to(transport.device) for _ in range(LAYOUT.num_layers)]


def _buffers(transport: LinkTransport, num_blocks: int) -> list[torch.Tensor]:
    shape = LAYOUT.block_set_shape(num_blocks)
    return [torch.full(shape, -1.0, dtype=torch.bfloat16, device=transport.device) for _ in range(LAYOUT.num_layers)]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact_and_states_progress(make_pair, kind: str) -> None:
    pair = make_pair(kind)
    blocks = [7, 2, 9, 4, 11]
    rx = pair.decode.open_receiver("req-1", blocks)
    assert rx.poll() is TransferState.PENDING
    out = _buffers(pair.decode, len(blocks))
    rx.recv_into(0, out[0])
    rx.recv_into(1, out[1])  # the rest are posted after their data arrived (staged path)
    tx = pair.prefill.open_sender("decode-0", "req-1", blocks)
    pair.watch("tx", tx)
    pair.watch("rx", rx)
    assert tx.poll() is TransferState.PENDING
    src = _layers(pair.prefill, len(blocks))
    tx.send(0, src[0])
    assert tx.poll() is TransferState.TRANSFERRING
    assert rx.wait_layer(0, timeout=10)
    assert rx.poll() is TransferState.TRANSFERRING
    for layer in range(1, LAYOUT.num_layers):
        tx.send(layer, src[layer])
    assert rx.wait_layer(3, timeout=0.2) is False  # no buffer posted yet: staged at most, not landed
    rx.recv_into(2, out[2])
    rx.recv_into(3, out[3])
    assert rx.wait(10) is TransferState.DONE
    assert tx.wait(10) is TransferState.DONE
    for sent, got in zip(src, out):
        assert torch.equal(sent.cpu(), got.cpu())
    assert pair.ended == {"tx": [TransferState.DONE], "rx": [TransferState.DONE]}


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_transfers_share_one_link(make_pair, kind: str) -> None:
    pair = make_pair(kind)
    transfers = []
    for n in range(3):
        blocks = list(range(n * 10, n * 10 + n + 1))
        out = _buffers(pair.decode, len(blocks))
        rx = pair.decode.open_receiver(f"req-{n}", blocks)
        for layer, buf in enumerate(out):
            rx.recv_into(layer, buf)
        tx = pair.prefill.open_sender("decode-0", f"req-{n}", blocks)
        transfers.append((tx, rx, _layers(pair.prefill, len(blocks), seed=n), out))
    for layer in range(LAYOUT.num_layers):  # interleave layers of all requests, as batched prefill does
        for tx, _, src, _ in transfers:
            tx.send(layer, src[layer])
    for tx, rx, src, out in transfers:
        assert rx.wait(10) is TransferState.DONE and tx.wait(10) is TransferState.DONE
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(src, out))
    assert len(pair.prefill._outbound) == 1


@pytest.mark.parametrize("side", ["sender", "receiver"])
@pytest.mark.parametrize("kind", KINDS)
def test_abort_on_either_side_ends_both(make_pair, kind: str, side: str) -> None:
    pair = make_pair(kind)
    blocks = [1, 2]
    rx = pair.decode.open_receiver("req-a", blocks)
    tx = pair.prefill.open_sender("decode-0", "req-a", blocks)
    pair.watch("tx", tx)
    pair.watch("rx", rx)
    src = _layers(pair.prefill, len(blocks))
    tx.send(0, src[0])
    tx.send(1, src[1])
    (tx if side == "sender" else rx).abort("client went away")
    assert tx.wait(10) is TransferState.ABORTED
    assert rx.wait(10) is TransferState.ABORTED
    assert isinstance(tx.error, TransferAborted) and isinstance(rx.error, TransferAborted)
    assert "client went away" in str(tx.error if side == "sender" else rx.error)
    with pytest.raises(TransferAborted):
        tx.send(2, src[2])
    with pytest.raises(TransferAborted):
        rx.wait_layer(3, timeout=1)


@pytest.mark.parametrize("kind", KINDS)
def test_timeout_ends_both_sides(make_pair, kind: str) -> None:
    pair = make_pair(kind)
    blocks = [5]
    rx = pair.decode.open_receiver("req-t", blocks, timeout_s=0.5)
    tx = pair.prefill.open_sender("decode-0", "req-t", blocks, timeout_s=30)
    pair.watch("tx", tx)
    pair.watch("rx", rx)
    tx.send(0, _layers(pair.prefill, 1)[0])  # the prefill stalls after one layer
    assert rx.wait(10) is TransferState.TIMED_OUT
    assert tx.wait(10) is TransferState.TIMED_OUT  # told by the receiver, long before its own deadline
    with pytest.raises(TransferTimeout):
        rx.wait_layer(1, timeout=1)


@pytest.mark.parametrize("kind", KINDS)
def test_sender_times_out_when_receiver_never_opens(make_pair, kind: str) -> None:
    pair = make_pair(kind)
    tx = pair.prefill.open_sender("decode-0", "req-orphan", [1], timeout_s=0.5)
    pair.watch("tx", tx)
    for layer, tensor in enumerate(_layers(pair.prefill, 1)):
        tx.send(layer, tensor)
    assert tx.wait(10) is TransferState.TIMED_OUT
    assert _until(lambda: not pair.decode._receivers)  # the staged layers were dropped with it


@pytest.mark.parametrize("field_name, value", [("dtype", "float16"), ("block_size", 32), ("num_layers", 2)])
@pytest.mark.parametrize("kind", KINDS)
def test_handshake_refuses_incompatible_layouts(make_pair, kind: str, field_name: str, value) -> None:
    other = KVLayout(**{**LAYOUT.to_dict(), field_name: value})
    pair = make_pair(kind, decode_layout=other)
    with pytest.raises(HandshakeError) as refused:
        pair.prefill.open_sender("decode-0", "req-h", [1])
    assert refused.value.field == field_name
    assert field_name in str(refused.value) and repr(value) in str(refused.value)
    assert not pair.prefill._outbound


@pytest.mark.parametrize("kind", KINDS)
def test_peer_refuses_even_when_the_registry_is_stale(make_pair, kind: str) -> None:
    other = KVLayout(**{**LAYOUT.to_dict(), "dtype": "float16"})
    pair = make_pair(kind, decode_layout=other)
    real = pair.decode.endpoint
    pair.registry.register(EndpointInfo(real.instance_id, LAYOUT, real.transport, real.address))  # lies about dtype
    started = time.monotonic()
    tx = pair.prefill.open_sender("decode-0", "req-s", [1])  # returns at once; the dial runs elsewhere
    assert time.monotonic() - started < 0.5
    assert tx.wait(10) is TransferState.FAILED
    assert isinstance(tx.error, HandshakeError) and "peer refused the pair" in str(tx.error)
    assert tx.error.field == "dtype" and "dtype differs" in str(tx.error)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_peer_is_refused(make_pair, kind: str) -> None:
    pair = make_pair(kind)
    with pytest.raises(HandshakeError, match="no KV endpoint registered for instance 'decode-9'"):
        pair.prefill.open_sender("decode-9", "req-u", [1])


@pytest.mark.parametrize("kind", KINDS)
def test_peer_death_fails_both_sides_and_the_next_transfer_redials(make_pair, kind: str) -> None:
    pair = make_pair(kind)
    rx = pair.decode.open_receiver("req-d", [1, 2])
    tx = pair.prefill.open_sender("decode-0", "req-d", [1, 2])
    pair.watch("tx", tx)
    pair.watch("rx", rx)
    src = _layers(pair.prefill, 2)
    tx.send(0, src[0])
    assert _until(lambda: rx.poll() is TransferState.TRANSFERRING)  # layer 0 staged (no buffer posted)
    pair.kill_decode()
    assert tx.wait(10) is TransferState.FAILED and isinstance(tx.error, PeerLostError)
    assert rx.wait(10) is TransferState.FAILED and isinstance(rx.error, PeerLostError)
    if kind == "loopback":
        return  # a killed loopback listener stays dead, like a dead process
    rx2 = pair.decode.open_receiver("req-d2", [3])
    out = _buffers(pair.decode, 1)
    for layer, buf in enumerate(out):
        rx2.recv_into(layer, buf)
    tx2 = pair.prefill.open_sender("decode-0", "req-d2", [3])
    for layer, tensor in enumerate(_layers(pair.prefill, 1)):
        tx2.send(layer, tensor)
    assert tx2.wait(10) is TransferState.DONE and rx2.wait(10) is TransferState.DONE


@pytest.mark.parametrize("kind", KINDS)
def test_block_set_mismatch_fails_both_sides(make_pair, kind: str) -> None:
    pair = make_pair(kind)
    rx = pair.decode.open_receiver("req-b", [1, 2])
    tx = pair.prefill.open_sender("decode-0", "req-b", [2, 1])
    with pytest.raises(BlockSetError):
        tx.send(0, _layers(pair.prefill, 3)[0])  # wrong number of blocks: refused locally
    tx.send(0, _layers(pair.prefill, 2)[0])
    assert rx.wait(10) is TransferState.FAILED and isinstance(rx.error, BlockSetError)
    assert tx.wait(10) is TransferState.FAILED and "block ids" in str(tx.error)


# -- failure paths only the loopback's fault injection can force ---------------------------

def test_dropped_layer_times_out(make_pair) -> None:
    pair = make_pair("loopback", faults=FaultPlan(drop_layers=frozenset({2})))
    rx = pair.decode.open_receiver("req-x", [1], timeout_s=0.4)
    for layer, buf in enumerate(_buffers(pair.decode, 1)):
        rx.recv_into(layer, buf)
    tx = pair.prefill.open_sender("decode-0", "req-x", [1])
    for layer, tensor in enumerate(_layers(pair.prefill, 1)):
        tx.send(layer, tensor)
    assert rx.wait_layer(3, timeout=10) is True  # layer 3 landed, layer 2 never will
    assert rx.wait(10) is TransferState.TIMED_OUT
    assert tx.wait(10) is TransferState.TIMED_OUT


def test_link_breaking_at_layer_k_fails_both_and_spares_other_links(make_pair) -> None:
    pair = make_pair("loopback", faults=FaultPlan(break_at_layer=1))
    rx = pair.decode.open_receiver("req-k", [1])
    tx = pair.prefill.open_sender("decode-0", "req-k", [1])
    pair.watch("tx", tx)
    pair.watch("rx", rx)
    for layer, tensor in enumerate(_layers(pair.prefill, 1)):
        try:
            tx.send(layer, tensor)
        except PeerLostError:
            break
    assert tx.wait(10) is TransferState.FAILED and rx.wait(10) is TransferState.FAILED
    assert isinstance(rx.error, PeerLostError)


def test_abort_mid_transfer_skips_queued_layers(make_pair) -> None:
    pair = make_pair("loopback", faults=FaultPlan(delay_s=0.1))
    rx = pair.decode.open_receiver("req-m", [1])
    tx = pair.prefill.open_sender("decode-0", "req-m", [1])
    pair.watch("rx", rx)
    for layer, tensor in enumerate(_layers(pair.prefill, 1)):
        tx.send(layer, tensor)
    assert _until(lambda: rx.poll() is TransferState.TRANSFERRING)
    started = time.monotonic()
    tx.abort("preempted")
    assert rx.wait(10) is TransferState.ABORTED
    assert time.monotonic() - started < 0.35  # did not wait for the three queued layers


def test_done_callback_runs_once_even_when_it_raises(make_pair) -> None:
    pair = make_pair("loopback")
    rx = pair.decode.open_receiver("req-c", [1])
    calls: list[TransferState] = []
    lock = threading.Lock()

    def bad_owner(state: TransferState) -> None:
        with lock:
            calls.append(state)
        raise RuntimeError("owner bug")

    rx.add_done_callback(bad_owner)
    rx.abort()
    rx.abort()
    rx.add_done_callback(calls.append)  # late registration runs at once
    assert calls == [TransferState.ABORTED, TransferState.ABORTED]


def test_layout_check_names_the_field() -> None:
    with pytest.raises(HandshakeError, match=r"head_dim differs \(32 at a, 64 at b\)") as err:
        LAYOUT.check_compatible(KVLayout(**{**LAYOUT.to_dict(), "head_dim": 64}), here="a", there="b")
    assert err.value.field == "head_dim"
    LAYOUT.check_compatible(KVLayout(**LAYOUT.to_dict()))
    with pytest.raises(ValueError):
        KVLayout(model="m", dtype="notatype", block_size=16, num_layers=1, num_kv_heads=1, head_dim=8)


def test_transport_errors_are_typed() -> None:
    assert issubclass(HandshakeError, TransferError) and issubclass(TransferTimeout, TransferError)
    with pytest.raises(TransferError, match="unknown KV transport"):
        make_transport("carrier-pigeon", "x", LAYOUT, EndpointRegistry())
