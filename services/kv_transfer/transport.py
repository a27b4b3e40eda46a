"""The generic link-based transport: tables of transfers, lazy pairing, frame dispatch.

Lifecycle: `start()` makes the concrete transport listen (OS-assigned
address), registers the endpoint and starts the deadline watch. The first
`open_sender` to a peer dials it, runs the handshake and keeps the outbound
link for later transfers; peers that dial in get an inbound link each. Frames
from links land in `on_frame`; transfers end through `TransferRecord.finish`,
which calls `_on_terminal` here to forget them and tell the peer. A lost link
fails its transfers; the next sender to that peer dials again. `close()` ends
everything and unregisters.

Concrete transports (tcp, gloo, nccl, loopback) supply `_listen`, `_dial`,
`_stop_listening` and optionally `_welcome_details`/`_pair` (to form a
process group over the control channel); they call `_accept(channel)` for
every incoming connection.
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from pdserve.kv_transfer import handshake
from pdserve.kv_transfer.base import KVReceiver, KVSender, KVTransport, TransferState
from pdserve.kv_transfer.channel import Channel
from pdserve.kv_transfer.config import TransportConfig
from pdserve.kv_transfer.errors import (HandshakeError, PeerLostError, ProtocolError, TransferAborted, TransferError,
                                        TransferTimeout)
from pdserve.kv_transfer.frames import Frame, FrameKind, meta_field
from pdserve.kv_transfer.layout import EndpointInfo, KVLayout
from pdserve.kv_transfer.link import InboundLink, Link, OutboundLink
from pdserve.kv_transfer.registry import EndpointRegistry
from pdserve.kv_transfer.transfer import LinkReceiver, LinkSender, TransferRecord
from pdserve.kv_transfer.watchdog import DeadlineWatch

log = logging.getLogger(__name__)

# How a peer's ABORT frame maps to the state and error this side reports.
_PEER_END = {
    TransferState.ABORTED.value: (TransferState.ABORTED, TransferAborted),
    TransferState.TIMED_OUT.value: (TransferState.TIMED_OUT, TransferTimeout),
    TransferState.FAILED.value: (TransferState.FAILED, TransferError),
}


class LinkTransport(KVTransport):
    kind: ClassVar[str]

    def __init__(self, instance_id: str, layout: KVLayout, registry: EndpointRegistry,
                 config: TransportConfig | None = None) -> None:
        self.instance_id, self.layout, self.registry = instance_id, layout, registry
        self.config = config or TransportConfig()
        self.device = torch.device("cpu")
        self._lock = threading.Lock()
        self._dial_locks: dict[str, threading.Lock] = {}
        self._outbound: dict[str, OutboundLink] = {}
        self._inbound: set[InboundLink] = set()
        self._senders: dict[str, LinkSender] = {}
        self._receivers: dict[str, LinkReceiver] = {}
        self._finished: OrderedDict[str, TransferState] = OrderedDict()
        self._watch = DeadlineWatch(instance_id)
        self._endpoint: EndpointInfo | None = None
        self._closed = False

    # -- hooks for concrete transports -------------------------------------------------
    @abstractmethod
    def _listen(self) -> str:
        """Start accepting connections; return the address peers dial."""

    @abstractmethod
    def _dial(self, address: str) -> Channel:
        """Open a raw channel to a peer's address (OSError/TransferError on failure)."""

    @abstractmethod
    def _stop_listening(self) -> None: ...

    def _welcome_details(self, peer: EndpointInfo) -> dict[str, Any]:
        return {}

    def _pair(self, channel: Channel, role: str, details: dict[str, Any], peer: EndpointInfo) -> Channel:
        """Turn a handshaken control channel into the data channel (identity for in-band transports)."""
        return channel

    # -- KVTransport ------------------------------------------------------------------
    @property
    def endpoint(self) -> EndpointInfo:
        if self._endpoint is None:
            raise TransferError(f"{self.kind} transport of {self.instance_id} not started")
        return self._endpoint

    def start(self) -> EndpointInfo:
        if self._endpoint is None:
            address = self._listen()
            self._endpoint = EndpointInfo(self.instance_id, self.layout, self.kind, address)
            self._watch.start()
            self.registry.register(self._endpoint)
        return self._endpoint

    def open_sender(self, peer_id: str, transfer_id: str, block_ids: Sequence[int],
                    timeout_s: float | None = None) -> KVSender:
        """Returns at once: with no live link to the peer yet, it is dialled on a thread of its own
        (the caller may be an engine thread in a forward pass) and the sender holds its layers.
        What the registry can tell without the network (unknown peer, other layout) raises here;
        a refusal by the peer itself fails the sender (`poll()` FAILED, `error` a HandshakeError)."""
        with self._lock:
            link = self._outbound.get(peer_id)
        if link is None or not link.alive:
            self.registry.pair(self.endpoint, peer_id)
        record = self._new_record(transfer_id, "sender", block_ids, self.layout.num_layers, timeout_s)
        sender = LinkSender(record, self.layout, self.device)
        with self._lock:
            if self._closed:
                raise TransferError(f"transport of {self.instance_id} is closed")
            if transfer_id in self._senders:
                raise TransferError(f"transfer {transfer_id} is already being sent")
            link = self._outbound.get(peer_id)
            record.link = link if link is not None and link.alive else None
            self._senders[transfer_id] = sender
        self._watch.schedule(record.deadline, record.expire)
        if record.link is None:
            threading.Thread(target=self._dial_for, args=(peer_id, sender), daemon=True,
                             name=f"kv-dial-{peer_id}").start()
        return sender

    def _dial_for(self, peer_id: str, sender: LinkSender) -> None:
        try:
            link = self._link_to(peer_id)
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, closed: the transfer fails
            error = exc if isinstance(exc, TransferError) else HandshakeError(f"cannot reach {peer_id}: {exc}")
            sender.record.finish(TransferState.FAILED, error)
            return
        sender.attach(link)
        if sender.poll().terminal:  # ended while dialling (timeout, abort): tell the receiver now
            link.send_control(self._end_frame(sender.record))

    def open_receiver(self, transfer_id: str, block_ids: Sequence[int],
                      timeout_s: float | None = None, expect_token: bool = False) -> KVReceiver:
        timeout = timeout_s or self.config.transfer_timeout_s
        with self._lock:
            existing = self._receivers.get(transfer_id)
            if existing is None:
                record = self._new_record(transfer_id, "receiver", block_ids, self.layout.num_layers, timeout)
                receiver = LinkReceiver(record, self.layout, self.device, claimed=True)
                receiver.expect_token = expect_token
                self._receivers[transfer_id] = receiver
                self._finished.pop(transfer_id, None)
            elif existing.claimed:
                raise TransferError(f"transfer {transfer_id} already has a receiver")
        if existing is not None:
            existing.claim(block_ids, timeout, expect_token)  # data came first: adopt its staged layers
            receiver = existing
        self._watch.schedule(receiver.record.deadline, receiver.record.expire)
        return receiver

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            transfers = [*self._senders.values(), *self._receivers.values()]
        for transfer in transfers:
            transfer.record.finish(TransferState.FAILED, TransferError(f"transport of {self.instance_id} closed"),
                                   notify_peer=True)
        if self._endpoint is not None:
            self.registry.unregister(self.instance_id, self._endpoint.address)
        self._stop_listening()
        with self._lock:
            links: list[Link] = [*self._outbound.values(), *self._inbound]
            self._outbound.clear()
            self._inbound.clear()
        for link in links:
            link.close()
        self._watch.stop()

    # -- pairing ----------------------------------------------------------------------
    def _link_to(self, peer_id: str) -> OutboundLink:
        with self._lock:
            if self._closed:
                raise TransferError(f"transport of {self.instance_id} is closed")
            dial_lock = self._dial_locks.setdefault(peer_id, threading.Lock())
        with dial_lock:  # one handshake per peer even when many senders open at once
            with self._lock:
                link = self._outbound.get(peer_id)
            if link is not None and link.alive:
                return link
            peer = self.registry.pair(self.endpoint, peer_id)
            link = OutboundLink(self._connect(peer), peer, self)
            with self._lock:
                self._outbound[peer_id] = link
            link.start()
            return link

    def _connect(self, peer: EndpointInfo) -> Channel:
        try:
            channel = self._dial(peer.address)
        except OSError as exc:
            raise HandshakeError(f"cannot reach {peer.instance_id} at {peer.address}: {exc}") from exc
        try:
            details = handshake.dial(channel, self.endpoint, self.config.connect_timeout_s)
            return self._pair(channel, "dialer", details, peer)
        except BaseException:
            channel.close()
            raise

    def _accept(self, channel: Channel) -> None:
        """Run the acceptor's handshake on a new connection (on its own thread) and keep the link."""
        try:
            peer, details = handshake.accept(channel, self.endpoint, self.config.connect_timeout_s,
                                             self._welcome_details)
            channel = self._pair(channel, "acceptor", details, peer)
        except Exception as exc:  # noqa: BLE001 - a bad dialer must not take the listener down
            log.warning("KV handshake at %s refused or failed: %s", self.instance_id, exc)
            channel.close()
            return
        link = InboundLink(channel, peer, self)
        with self._lock:
            if self._closed:
                link.close()
                return
            self._inbound.add(link)
        link.start()

    # -- frames from links ------------------------------------------------------------
    def on_frame(self, link: Link, frame: Frame) -> None:
        if frame.kind is FrameKind.DATA and isinstance(link, InboundLink):
            self._on_data(link, frame)
        elif frame.kind is FrameKind.DONE and isinstance(link, OutboundLink):
            sender = self._transfer(self._senders, meta_field(frame, "transfer_id", str))
            if sender is not None:
                sender.record.finish(TransferState.DONE)
        elif frame.kind is FrameKind.TOKEN and isinstance(link, InboundLink):
            receiver = self._transfer(self._receivers, meta_field(frame, "transfer_id", str))
            tokens = meta_field(frame, "token_ids", list)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
                raise ProtocolError(f"TOKEN frame from {link.peer.instance_id} carries invalid token ids")
            if receiver is not None:
                receiver.token_arrived(tokens)
        elif frame.kind is FrameKind.ABORT:
            self._on_abort(link, frame)
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame on a link from {link.peer.instance_id}")

    def _transfer(self, table: dict[str, Any], transfer_id: str) -> Any:
        with self._lock:
            return table.get(transfer_id)

    def _on_data(self, link: InboundLink, frame: Frame) -> None:
        tid = meta_field(frame, "transfer_id", str)
        layer = meta_field(frame, "layer", int)
        block_ids = meta_field(frame, "block_ids", list)
        receiver = self._receiver_for_data(link, frame, tid, block_ids)
        if receiver is None:
            return
        try:
            receiver.check_frame(layer, block_ids, meta_field(frame, "dtype", str), meta_field(frame, "shape", list))
        except TransferError as exc:
            link.channel.discard_payload(frame, self.device)
            receiver.record.finish(TransferState.FAILED, exc, notify_peer=True)
            return
        target, staged = receiver.target_for(layer)
        link.channel.recv_payload(frame, target)
        receiver.layer_arrived(layer, target, staged)

    def _receiver_for_data(self, link: InboundLink, frame: Frame, tid: str, block_ids: list) -> LinkReceiver | None:
        """The receiver a DATA frame belongs to, created unclaimed if data came first; None to drop it."""
        with self._lock:
            receiver = self._receivers.get(tid)
            finished = self._finished.get(tid)
            if receiver is None and finished is None:
                timeout = max(float(frame.meta.get("timeout_s", 0.0)), 0.001)
                record = self._new_record(tid, "receiver", block_ids, self.layout.num_layers, timeout)
                receiver = LinkReceiver(record, self.layout, self.device, claimed=False)
                self._receivers[tid] = receiver
                self._watch.schedule(record.deadline, record.expire)
        if receiver is None:
            # Already ended here; the sender may not know yet (it ended before any link existed).
            link.channel.discard_payload(frame, self.device)
            state = finished.value if finished is not TransferState.DONE else TransferState.FAILED.value
            link.send_control(Frame(FrameKind.ABORT, {"transfer_id": tid, "state": state,
                                                      "message": "transfer already ended at the receiver"}))
            return None
        receiver.record.link = link
        return receiver

    def _on_abort(self, link: Link, frame: Frame) -> None:
        tid = meta_field(frame, "transfer_id", str)
        table = self._senders if isinstance(link, OutboundLink) else self._receivers
        transfer = self._transfer(table, tid)
        if transfer is None:
            return
        state, error_type = _PEER_END.get(str(frame.meta.get("state")), _PEER_END[TransferState.FAILED.value])
        message = f"transfer {tid} ended at {link.peer.instance_id}: {frame.meta.get('message', state.value)}"
        transfer.record.finish(state, error_type(message))

    def on_link_lost(self, link: Link, error: TransferError) -> None:
        with self._lock:
            if isinstance(link, OutboundLink) and self._outbound.get(link.peer.instance_id) is link:
                del self._outbound[link.peer.instance_id]
            self._inbound.discard(link)  # type: ignore[arg-type]
            affected = [t for t in (*self._senders.values(), *self._receivers.values()) if t.record.link is link]
        for transfer in affected:
            transfer.record.finish(TransferState.FAILED, PeerLostError(f"transfer {transfer.transfer_id}: {error}"))

    # -- transfer bookkeeping -----------------------------------------------------------
    def _new_record(self, tid: str, role: str, block_ids: Sequence[int], num_layers: int,
                    timeout_s: float | None) -> TransferRecord:
        return TransferRecord(tid, role, block_ids, num_layers, timeout_s or self.config.transfer_timeout_s,
                              self._on_terminal)

    def _on_terminal(self, record: TransferRecord, notify_peer: bool) -> None:
        with self._lock:
            table: dict[str, Any] = self._senders if record.role == "sender" else self._receivers
            transfer = table.get(record.transfer_id)
            if transfer is not None and transfer.record is record:
                del table[record.transfer_id]
            self._finished[record.transfer_id] = record.state
            while len(self._finished) > self.config.finished_memory:
                self._finished.popitem(last=False)
        if isinstance(transfer, LinkReceiver):
            transfer.release()
        if notify_peer and record.link is not None:
            record.link.send_control(self._end_frame(record))

    @staticmethod
    def _end_frame(record: TransferRecord) -> Frame:
        if record.state is TransferState.DONE:
            return Frame(FrameKind.DONE, {"transfer_id": record.transfer_id})
        message = str(record.error) if record.error else record.state.value
        return Frame(FrameKind.ABORT, {"transfer_id": record.transfer_id, "state": record.state.value,
                                       "message": message})
