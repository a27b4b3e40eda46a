"""The loopback transport: in-process queues instead of sockets, with fault injection.

Lifecycle: a test (or a single-process demo) creates one `LoopbackFabric` and
passes it to every `LoopbackTransport`; `start()` puts the transport on the
fabric under a fresh `loopback://` address. Dialing makes a pair of queue
channels and runs the peer's acceptor handshake on a thread, exactly like an
incoming TCP connection, so the links, handshake and transfer bookkeeping are
the same code the real transports run. The fabric's `FaultPlan` delays, drops
or breaks DATA frames; `kill(address)` simulates a peer dying.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time

import torch

from pdserve.kv_transfer.channel import Channel, as_bytes
from pdserve.kv_transfer.config import TransportConfig
from pdserve.kv_transfer.errors import HandshakeError, PeerLostError, ProtocolError
from pdserve.kv_transfer.faults import FaultPlan
from pdserve.kv_transfer.frames import Frame, FrameKind
from pdserve.kv_transfer.layout import KVLayout
from pdserve.kv_transfer.registry import EndpointRegistry
from pdserve.kv_transfer.transport import LinkTransport

_CLOSED = object()  # queue sentinel: the other end is gone


class MemoryChannel(Channel):
    """One end of an in-process duplex pipe; the payload travels by reference, copied once on receipt."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, faults: FaultPlan) -> None:
        self._inbox, self._outbox, self._faults = inbox, outbox, faults
        self._timeout: float | None = None
        self._pending: torch.Tensor | None = None
        self._closed = False
        self._peer: MemoryChannel | None = None

    def send(self, frame: Frame, payload: torch.Tensor | None = None) -> None:
        if self._closed:
            raise PeerLostError("loopback channel closed")
        if frame.kind is FrameKind.DATA:
            layer = frame.meta.get("layer")
            if self._faults.delay_s:
                time.sleep(self._faults.delay_s)
            if isinstance(layer, int) and self._faults.breaks(layer):
                self.close()
                raise PeerLostError(f"injected fault: link broke at layer {layer}")
            if isinstance(layer, int) and self._faults.drops(layer):
                return
        self._outbox.put((frame, payload))

    def recv_frame(self) -> Frame:
        try:
            item = self._inbox.get(timeout=self._timeout)
        except queue.Empty as exc:
            raise PeerLostError("loopback peer did not answer in time") from exc
        if item is _CLOSED:
            self._inbox.put(_CLOSED)  # stay closed for any later read
            raise PeerLostError("loopback peer closed the channel")
        frame, self._pending = item
        return frame

    def recv_payload(self, frame: Frame, into: torch.Tensor) -> None:
        payload, self._pending = self._pending, None
        if payload is None or payload.numel() * payload.element_size() != frame.payload_nbytes:
            raise ProtocolError("loopback payload missing or of the wrong size")
        target = as_bytes(into)
        if target.numel() != frame.payload_nbytes:
            raise ProtocolError(f"payload of {frame.payload_nbytes} bytes for a {target.numel()}-byte buffer")
        target.copy_(as_bytes(payload))

    def set_timeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox.put(_CLOSED)
        self._inbox.put(_CLOSED)  # wake our own reader too
        if self._peer is not None:
            self._peer.close()


def channel_pair(faults: FaultPlan) -> tuple[MemoryChannel, MemoryChannel]:
    a_to_b: queue.Queue = queue.Queue()
    b_to_a: queue.Queue = queue.Queue()
    a, b = MemoryChannel(b_to_a, a_to_b, faults), MemoryChannel(a_to_b, b_to_a, faults)
    a._peer, b._peer = b, a  # closing either end ends both, as a dead socket does
    return a, b


class LoopbackFabric:
    """The in-process 'network': addresses -> transports, plus the faults it injects."""

    def __init__(self, faults: FaultPlan | None = None) -> None:
        self.faults = faults or FaultPlan()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._listeners: dict[str, LoopbackTransport] = {}
        self._channels: dict[str, list[MemoryChannel]] = {}

    def listen(self, transport: LoopbackTransport) -> str:
        with self._lock:
            address = f"loopback://{transport.instance_id}/{next(self._ids)}"
            self._listeners[address] = transport
            self._channels[address] = []
        return address

    def unlisten(self, address: str) -> None:
        with self._lock:
            self._listeners.pop(address, None)

    def dial(self, address: str) -> MemoryChannel:
        with self._lock:
            listener = self._listeners.get(address)
            if listener is None:
                raise HandshakeError(f"nothing listens at {address}")
            mine, theirs = channel_pair(self.faults)
            self._channels[address].extend((mine, theirs))
        threading.Thread(target=listener.accept_channel, args=(theirs,), daemon=True,
                         name=f"kv-loopback-{listener.instance_id}-handshake").start()
        return mine

    def kill(self, address: str) -> None:
        """Simulate the death of the transport at `address`: it stops listening and every pipe to it breaks."""
        with self._lock:
            self._listeners.pop(address, None)
            channels = self._channels.pop(address, [])
        for channel in channels:
            channel.close()


class LoopbackTransport(LinkTransport):
    kind = "loopback"

    def __init__(self, instance_id: str, layout: KVLayout, registry: EndpointRegistry, fabric: LoopbackFabric,
                 config: TransportConfig | None = None) -> None:
        super().__init__(instance_id, layout, registry, config)
        self.fabric = fabric
        self._address: str | None = None

    def _listen(self) -> str:
        self._address = self.fabric.listen(self)
        return self._address

    def _dial(self, address: str) -> Channel:
        return self.fabric.dial(address)

    def accept_channel(self, channel: Channel) -> None:
        self._accept(channel)

    def _stop_listening(self) -> None:
        if self._address is not None:
            self.fabric.unlisten(self._address)
