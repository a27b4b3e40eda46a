"""A link: one paired channel plus the threads that drive it.

Lifecycle: a transport creates an `OutboundLink` when it first sends to a peer
(after the handshake) and an `InboundLink` for each peer that dials it. A
link's reader thread hands every frame to the transport; an outbound link's
writer thread sends queued layers in order, skipping transfers that ended
meanwhile. When the channel breaks the link reports itself lost once, and the
transport fails every transfer bound to it; `close()` stops it quietly.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pdserve.kv_transfer.channel import Channel
from pdserve.kv_transfer.errors import PeerLostError, TransferError
from pdserve.kv_transfer.frames import Frame
from pdserve.kv_transfer.layout import EndpointInfo

if TYPE_CHECKING:
    from pdserve.kv_transfer.transfer import LinkSender

log = logging.getLogger(__name__)


TOKEN_ITEM = -1  # writer-queue marker: send the sender's TOKEN frame
CONTROL_ITEM = -2  # writer-queue marker: send this control frame

class LinkHandler(Protocol):
    def on_frame(self, link: Link, frame: Frame) -> None: ...
    def on_link_lost(self, link: Link, error: TransferError) -> None: ...


def as_transfer_error(exc: BaseException, peer: str) -> TransferError:
    """Whatever broke a channel (socket, gloo, NCCL), as the typed error transfers report."""
    if isinstance(exc, TransferError):
        return exc
    return PeerLostError(f"link to {peer} broke: {type(exc).__name__}: {exc}")


class Link:
    def __init__(self, channel: Channel, peer: EndpointInfo, handler: LinkHandler, direction: str) -> None:
        self.channel = channel
        self.peer = peer
        self._handler = handler
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"kv-{direction}-{peer.instance_id}-reader")

    @property
    def alive(self) -> bool:
        return not self._closed.is_set()

    def start(self) -> None:
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while not self._closed.is_set():
                self._handler.on_frame(self, self.channel.recv_frame())
        except Exception as exc:  # noqa: BLE001 - any channel failure ends the link the same way
            self.lost(exc)

    def send_control(self, frame: Frame) -> None:
        """Send a payload-less frame; a failure ends the link (the peer is then unreachable anyway)."""
        if not self.alive:
            return
        try:
            self.channel.send(frame)
        except Exception as exc:  # noqa: BLE001
            self.lost(exc)

    def lost(self, exc: BaseException) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.channel.close()
        error = as_transfer_error(exc, self.peer.instance_id)
        log.info("KV link to %s lost: %s", self.peer.instance_id, error)
        self._handler.on_link_lost(self, error)

    def close(self) -> None:
        self._closed.set()
        self.channel.close()


class InboundLink(Link):
    def __init__(self, channel: Channel, peer: EndpointInfo, handler: LinkHandler) -> None:
        super().__init__(channel, peer, handler, "in")


class OutboundLink(Link):
    """Adds the writer thread, so `send()` never blocks a prefill's forward pass."""

    def __init__(self, channel: Channel, peer: EndpointInfo, handler: LinkHandler) -> None:
        super().__init__(channel, peer, handler, "out")
        # (sender, layer, tensor) for a DATA frame, (sender, TOKEN_ITEM, None) for its TOKEN frame,
        # (frame, CONTROL_ITEM, None) for a control frame.
        self._queue: queue.SimpleQueue[tuple[Any, int, torch.Tensor | None] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name=f"kv-out-{peer.instance_id}-writer")

    def start(self) -> None:
        super().start()
        self._writer.start()

    def enqueue(self, sender: LinkSender, layer: int, tensor: torch.Tensor) -> None:
        if not self.alive:
            raise PeerLostError(f"link to {self.peer.instance_id} is down")
        self._queue.put((sender, layer, tensor))

    def enqueue_token(self, sender: LinkSender) -> None:
        """The sender's TOKEN frame, behind the layers already queued (one queue keeps the order)."""
        if not self.alive:
            raise PeerLostError(f"link to {self.peer.instance_id} is down")
        self._queue.put((sender, TOKEN_ITEM, None))

    def send_control(self, frame: Frame) -> None:
        """Queued for the writer: the caller (the deadline watch, an engine thread) never waits on a
        send that a slow or frozen peer holds up."""
        if self.alive:
            self._queue.put((frame, CONTROL_ITEM, None))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or not self.alive:
                return
            sender, layer, tensor = item
            if layer == CONTROL_ITEM:
                super().send_control(sender)
                continue
            if sender.poll().terminal:
                continue  # aborted or timed out while queued: its blocks may already be freed
            try:
                if tensor is None:
                    self.channel.send(sender.token_frame())
                else:
                    self.channel.send(sender.data_frame(layer, tensor), tensor)
            except Exception as exc:  # noqa: BLE001
                self.lost(exc)
                return

    def close(self) -> None:
        super().close()
        self._queue.put(None)
