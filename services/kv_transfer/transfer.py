"""One transfer's state machine, and the sender and receiver objects built on it.

Lifecycle: a transport creates a `TransferRecord` when a sender or receiver is
opened (or, on the receiving side, when data for an unknown transfer arrives
first). The record moves PENDING -> TRANSFERRING -> one terminal state exactly
once; `finish` runs the owner's callbacks and hands the record back to the
transport (`on_terminal`), which forgets it, frees staging buffers and, when
the end was decided here, tells the peer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pdserve.kv_transfer.base import DoneCallback, KVReceiver, KVSender, TransferState
from pdserve.kv_transfer.errors import BlockSetError, ProtocolError, TransferAborted, TransferError, TransferTimeout
from pdserve.kv_transfer.frames import Frame, FrameKind
from pdserve.kv_transfer.layout import KVLayout, dtype_name

if TYPE_CHECKING:
    from pdserve.kv_transfer.link import Link

log = logging.getLogger(__name__)

TerminalHook = Callable[["TransferRecord", bool], None]


def check_block_tensor(tensor: torch.Tensor, layout: KVLayout, num_blocks: int, device: torch.device, what: str) -> None:
    """Raise BlockSetError unless `tensor` is one layer of a `num_blocks` block set for `layout`."""
    expected = layout.block_set_shape(num_blocks)
    if tuple(tensor.shape) != expected:
        raise BlockSetError(f"{what}: shape {tuple(tensor.shape)} is not the block set's {expected}")
    if tensor.dtype != layout.torch_dtype:
        raise BlockSetError(f"{what}: dtype {dtype_name(tensor.dtype)} is not the layout's {layout.dtype}")
    if tensor.device.type != device.type:
        raise BlockSetError(f"{what}: tensor on {tensor.device}, transport moves {device.type} tensors")
    if not tensor.is_contiguous():
        raise BlockSetError(f"{what}: tensor must be contiguous (gather the blocks first)")


class TransferRecord:
    """State, error, deadline and callbacks of one transfer on one side."""

    def __init__(self, transfer_id: str, role: str, block_ids: Sequence[int], num_layers: int,
                 timeout_s: float, on_terminal: TerminalHook) -> None:
        self.transfer_id = transfer_id
        self.role = role  # "sender" or "receiver"
        self.block_ids = [int(b) for b in block_ids]
        self.num_layers = num_layers
        self.deadline = time.monotonic() + timeout_s
        self.cond = threading.Condition()
        self.state = TransferState.PENDING
        self.error: TransferError | None = None
        self.link: Link | None = None
        self._callbacks: list[DoneCallback] = []
        self._on_terminal = on_terminal

    def mark_transferring(self) -> None:
        with self.cond:
            if self.state is TransferState.PENDING:
                self.state = TransferState.TRANSFERRING

    def finish(self, state: TransferState, error: TransferError | None = None, *, notify_peer: bool = False) -> bool:
        """Move to a terminal state once; False if already terminal. Runs callbacks outside the lock."""
        with self.cond:
            if self.state.terminal:
                return False
            self.state, self.error = state, error
            callbacks, self._callbacks = self._callbacks, []
            self.cond.notify_all()
        self._on_terminal(self, notify_peer)
        for fn in callbacks:
            self._run_callback(fn, state)
        return True

    def add_callback(self, fn: DoneCallback) -> None:
        with self.cond:
            if not self.state.terminal:
                self._callbacks.append(fn)
                return
            state = self.state
        self._run_callback(fn, state)

    def _run_callback(self, fn: DoneCallback, state: TransferState) -> None:
        # An owner's callback frees blocks; its bug must not kill a link's reader thread.
        try:
            fn(state)
        except Exception:  # noqa: BLE001
            log.exception("done callback of transfer %s failed", self.transfer_id)

    def expire(self) -> None:
        """Called by the deadline watch: time out if the (possibly extended) deadline passed."""
        if time.monotonic() >= self.deadline:
            self.finish(TransferState.TIMED_OUT,
                        TransferTimeout(f"transfer {self.transfer_id} timed out on the {self.role} side"),
                        notify_peer=True)

    def wait(self, timeout: float | None) -> TransferState:
        with self.cond:
            self.cond.wait_for(lambda: self.state.terminal, timeout)
            return self.state

    def raise_if_terminal(self) -> None:
        with self.cond:
            if self.state.terminal:
                raise self.error or TransferError(f"transfer {self.transfer_id} already {self.state.value}")


class _Transfer:
    """The parts of KVTransfer both roles implement the same way."""

    record: TransferRecord

    @property
    def transfer_id(self) -> str:
        return self.record.transfer_id

    def poll(self) -> TransferState:
        return self.record.state

    def wait(self, timeout: float | None = None) -> TransferState:
        return self.record.wait(timeout)

    def add_done_callback(self, fn: DoneCallback) -> None:
        self.record.add_callback(fn)

    @property
    def error(self) -> TransferError | None:
        return self.record.error

    def abort(self, reason: str = "aborted") -> None:
        self.record.finish(TransferState.ABORTED,
                           TransferAborted(f"transfer {self.transfer_id} aborted by the {self.record.role}: {reason}"),
                           notify_peer=True)


class LinkSender(_Transfer, KVSender):
    """Pushes layers through an outbound link's writer thread.

    Opened before its link exists (the transport dials on another thread, so
    an engine thread never waits on a peer), it keeps what it is given until
    `attach()`; layers may reach the wire in any order, the token last.
    """

    def __init__(self, record: TransferRecord, layout: KVLayout, device: torch.device) -> None:
        self.record, self._layout, self._device = record, layout, device
        self._sent: set[int] = set()
        self._token_ids: list[int] | None = None
        self._backlog: list[tuple[int, torch.Tensor]] = []  # layers sent before the link was up

    def attach(self, link: Link) -> None:
        """The dial finished: flush what was sent meanwhile."""
        with self.record.cond:
            self.record.link = link
            backlog, self._backlog = self._backlog, []
            token = self._token_ids is not None
        for layer, tensor in backlog:
            link.enqueue(self, layer, tensor)
        if token:
            link.enqueue_token(self)

    def _link_or_hold(self, layer: int, tensor: torch.Tensor) -> Link | None:
        """The link, or None after keeping the layer for `attach()` (one lock: never both)."""
        with self.record.cond:
            link = self.record.link
            if link is None:
                self._backlog.append((layer, tensor))
        return link

    def send(self, layer_index: int, tensor: torch.Tensor) -> None:
        self.record.raise_if_terminal()
        if not 0 <= layer_index < self.record.num_layers:
            raise BlockSetError(f"layer {layer_index} outside 0..{self.record.num_layers - 1}")
        if layer_index in self._sent:
            raise BlockSetError(f"layer {layer_index} of transfer {self.transfer_id} sent twice")
        check_block_tensor(tensor, self._layout, len(self.record.block_ids), self._device, f"layer {layer_index}")
        self._sent.add(layer_index)
        self.record.mark_transferring()
        link = self._link_or_hold(layer_index, tensor)
        if link is not None:
            link.enqueue(self, layer_index, tensor)

    def send_token(self, token_ids: Sequence[int]) -> None:
        self.record.raise_if_terminal()
        if self._token_ids is not None:
            raise BlockSetError(f"tokens of transfer {self.transfer_id} sent twice")
        with self.record.cond:  # with no link yet, attach() sends the token; else we do
            self._token_ids = [int(t) for t in token_ids]
            link = self.record.link
        if link is not None:
            link.enqueue_token(self)

    def token_frame(self) -> Frame:
        return Frame(FrameKind.TOKEN, {"transfer_id": self.transfer_id, "token_ids": self._token_ids or []})

    def data_frame(self, layer_index: int, tensor: torch.Tensor) -> Frame:
        """The DATA frame of one layer; carries the remaining timeout so an unclaimed receiver can expire."""
        meta: dict[str, Any] = {
            "transfer_id": self.transfer_id, "layer": layer_index, "num_layers": self.record.num_layers,
            "block_ids": self.record.block_ids, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
            "timeout_s": max(self.record.deadline - time.monotonic(), 0.0),
        }
        return Frame(FrameKind.DATA, meta, tensor.numel() * tensor.element_size())


class LinkReceiver(_Transfer, KVReceiver):
    """Lands layers into posted buffers, staging those that arrive before their buffer."""

    def __init__(self, record: TransferRecord, layout: KVLayout, device: torch.device, *, claimed: bool) -> None:
        self.record, self._layout, self._device = record, layout, device
        self.claimed = claimed  # False while it exists only because data came first
        self.expect_token = False  # set by the opener: DONE needs the sender's tokens too
        self._token_ids: list[int] | None = None
        self._posted: dict[int, torch.Tensor] = {}
        self._staged: dict[int, torch.Tensor] = {}
        self._landed: set[int] = set()

    def recv_into(self, layer_index: int, out: torch.Tensor) -> None:
        self.record.raise_if_terminal()
        if not 0 <= layer_index < self.record.num_layers:
            raise BlockSetError(f"layer {layer_index} outside 0..{self.record.num_layers - 1}")
        check_block_tensor(out, self._layout, len(self.record.block_ids), self._device, f"buffer of layer {layer_index}")
        with self.record.cond:
            if layer_index in self._posted or layer_index in self._landed:
                raise BlockSetError(f"layer {layer_index} of transfer {self.transfer_id} posted twice")
            staged = self._staged.pop(layer_index, None)
            if staged is None:
                self._posted[layer_index] = out
                return
            out.copy_(staged)
        self._land(layer_index)

    def wait_layer(self, layer_index: int, timeout: float | None = None) -> bool:
        with self.record.cond:
            self.record.cond.wait_for(lambda: layer_index in self._landed or self.record.state.terminal, timeout)
            if self.record.state.terminal and self.record.state is not TransferState.DONE:
                raise self.record.error or TransferError(f"transfer {self.transfer_id} {self.record.state.value}")
            return layer_index in self._landed

    def check_frame(self, layer: int, block_ids: list[int], dtype: str, shape: list[int]) -> None:
        """Raise if a DATA frame's header does not fit this transfer (peer-caused, so typed)."""
        if not 0 <= layer < self.record.num_layers:
            raise ProtocolError(f"transfer {self.transfer_id}: layer {layer} outside 0..{self.record.num_layers - 1}")
        if block_ids != self.record.block_ids:
            raise BlockSetError(f"transfer {self.transfer_id}: peer sends block ids {block_ids[:8]}..., "
                                f"receiver reserved {self.record.block_ids[:8]}...")
        expected = list(self._layout.block_set_shape(len(block_ids)))
        if dtype != self._layout.dtype or shape != expected:
            raise BlockSetError(f"transfer {self.transfer_id}: peer sends {dtype}{shape}, expected {self._layout.dtype}{expected}")
        with self.record.cond:
            if layer in self._landed or layer in self._staged:
                raise ProtocolError(f"transfer {self.transfer_id}: layer {layer} arrived twice")

    def target_for(self, layer: int) -> tuple[torch.Tensor, bool]:
        """Where the reader should receive a layer: the posted buffer, or a new staging tensor (True)."""
        with self.record.cond:
            posted = self._posted.pop(layer, None)
        if posted is not None:
            return posted, False
        shape = self._layout.block_set_shape(len(self.record.block_ids))
        return torch.empty(shape, dtype=self._layout.torch_dtype, device=self._device), True

    def layer_arrived(self, layer: int, tensor: torch.Tensor, staged: bool) -> None:
        with self.record.cond:
            if self.record.state.terminal:
                return
            if staged:
                posted = self._posted.pop(layer, None)
                if posted is None:
                    self._staged[layer] = tensor
                    self.record.mark_transferring()
                    return
                posted.copy_(tensor)
        self._land(layer)

    @property
    def token_ids(self) -> list[int] | None:
        with self.record.cond:
            return None if self._token_ids is None else list(self._token_ids)

    def token_arrived(self, token_ids: list[int]) -> None:
        with self.record.cond:
            if self.record.state.terminal:
                return
            if self._token_ids is not None:
                raise ProtocolError(f"transfer {self.transfer_id}: tokens arrived twice")
            self._token_ids = [int(t) for t in token_ids]
        self._finish_if_complete()

    def _land(self, layer: int) -> None:
        with self.record.cond:
            self._landed.add(layer)
            self.record.cond.notify_all()
        self.record.mark_transferring()
        self._finish_if_complete()

    def _finish_if_complete(self) -> None:
        with self.record.cond:
            complete = self.claimed and len(self._landed) == self.record.num_layers and \
                (self._token_ids is not None or not self.expect_token)
        if complete:
            self.record.finish(TransferState.DONE, notify_peer=True)

    def claim(self, block_ids: Sequence[int], timeout_s: float, expect_token: bool = False) -> None:
        """Adopt a receiver that data created; the opener's block set must match what arrived."""
        if [int(b) for b in block_ids] != self.record.block_ids:
            error = BlockSetError(f"transfer {self.transfer_id}: opened with {len(block_ids)} blocks "
                                  f"but the peer sends {len(self.record.block_ids)} different ones")
            self.record.finish(TransferState.FAILED, error, notify_peer=True)
            raise error
        self.claimed = True
        self.expect_token = expect_token
        self.record.deadline = time.monotonic() + timeout_s

    def release(self) -> None:
        """Drop buffer references once terminal so staging memory is freed."""
        with self.record.cond:
            self._posted.clear()
            self._staged.clear()
