"""The transport interface: transfer states, the sender and receiver roles, the transport.

Lifecycle of one transfer (one request's KV, as a block set):

1. The decode side reserves blocks and opens a receiver:
   `rx = transport.open_receiver(transfer_id, block_ids, timeout_s)`; it posts one
   buffer per layer with `rx.recv_into(layer, out)` (before or after data arrives).
2. The prefill side opens a sender to the decode instance:
   `tx = transport.open_sender(peer_id, transfer_id, block_ids, timeout_s)`
   (the first sender to a peer forms the pair: lazy connect plus handshake) and
   pushes each layer as soon as it is computed with `tx.send(layer, tensor)`.
3. Both sides `poll()`: PENDING -> TRANSFERRING -> DONE, or end in FAILED,
   ABORTED or TIMED_OUT. Abort or timeout on either side ends the transfer on
   both. The sender is DONE only once the receiver has every layer in place.
4. The owner of each side's blocks frees them in a callback registered with
   `add_done_callback`: it runs exactly once, on whichever terminal state.

A block set is a list of block ids (the destination's ids) plus, per layer, a
tensor of shape `layout.block_set_shape(len(block_ids))`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from pdserve.kv_transfer.errors import TransferError
from pdserve.kv_transfer.layout import EndpointInfo


class TransferState(enum.Enum):
    """Where one transfer stands, as both roles report it from `poll()`."""

    PENDING = "pending"            # opened, no layer on the wire yet
    TRANSFERRING = "transferring"  # at least one layer sent or received
    DONE = "done"                  # every layer landed in the receiver's buffers
    FAILED = "failed"              # the link broke or a peer sent something invalid
    ABORTED = "aborted"            # either side called abort()
    TIMED_OUT = "timed_out"        # the deadline passed on either side

    @property
    def terminal(self) -> bool:
        return self not in (TransferState.PENDING, TransferState.TRANSFERRING)


DoneCallback = Callable[["TransferState"], None]


class KVTransfer(ABC):
    """What both roles share: identity, state, abort, waiting, completion callbacks."""

    transfer_id: str

    @abstractmethod
    def poll(self) -> TransferState:
        """Current state; never blocks."""

    @abstractmethod
    def abort(self, reason: str = "aborted") -> None:
        """End the transfer on both sides; a no-op once terminal."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> TransferState:
        """Block until terminal or `timeout` seconds pass; returns the state then."""

    @abstractmethod
    def add_done_callback(self, fn: DoneCallback) -> None:
        """Run `fn(state)` once, when the transfer reaches a terminal state (at once if it has)."""

    @property
    @abstractmethod
    def error(self) -> TransferError | None:
        """Why the transfer failed, aborted or timed out; None otherwise."""


class KVSender(KVTransfer):
    """The pushing role (prefill side): one per transfer."""

    @abstractmethod
    def send(self, layer_index: int, tensor: torch.Tensor) -> None:
        """Queue one layer's blocks; returns at once. The transport owns `tensor` until terminal."""

    @abstractmethod
    def send_token(self, token_ids: Sequence[int]) -> None:
        """Queue the tokens sampled from this KV (after its layers); returns at once.

        A receiver opened with `expect_token=True` is DONE only once they arrived.
        """


class KVReceiver(KVTransfer):
    """The receiving role (decode side): one per transfer."""

    @abstractmethod
    def recv_into(self, layer_index: int, out: torch.Tensor) -> None:
        """Post `out` as the destination of one layer (or copy the layer in if it already arrived)."""

    @abstractmethod
    def wait_layer(self, layer_index: int, timeout: float | None = None) -> bool:
        """Block until that layer is in its buffer (True) or `timeout` passes (False); raises if the transfer ended badly."""

    @property
    @abstractmethod
    def token_ids(self) -> list[int] | None:
        """The tokens the sender sampled from this KV (`send_token`), once they arrived."""


class KVTransport(ABC):
    """One instance's end of the KV transfer fabric; pairs with peers lazily."""

    @property
    @abstractmethod
    def endpoint(self) -> EndpointInfo:
        """What peers need to reach this transport (valid after `start()`)."""

    @abstractmethod
    def start(self) -> EndpointInfo:
        """Begin listening and register the endpoint; returns it."""

    @abstractmethod
    def open_sender(self, peer_id: str, transfer_id: str, block_ids: Sequence[int],
                    timeout_s: float | None = None) -> KVSender:
        """Start pushing a block set to `peer_id`; returns at once (dialling happens elsewhere).

        Raises HandshakeError if the registry already refuses the pair; a peer
        that refuses it at the handshake fails the sender instead.
        """

    @abstractmethod
    def open_receiver(self, transfer_id: str, block_ids: Sequence[int],
                      timeout_s: float | None = None, expect_token: bool = False) -> KVReceiver:
        """Expect a block set into `block_ids` from whichever peer sends `transfer_id`.

        With `expect_token` the transfer completes only once the sender's
        sampled tokens arrived too (a prefill's first token travels with its KV).
        """

    @abstractmethod
    def close(self) -> None:
        """Fail every live transfer, drop links, stop listening, unregister."""

    def __enter__(self) -> KVTransport:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
