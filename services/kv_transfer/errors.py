"""Typed errors of the KV transfer layer.

Lifecycle: raised by transports, senders and receivers; anything a peer can
cause (a refused handshake, a dead link, a malformed frame, a timeout) is one
of these, never an assert. They derive from pdserve's `EngineError`, so an
error that escapes to the gateway maps to a 500/503 like any engine failure.
"""

from __future__ import annotations

from pdserve.shared.errors import EngineError


class TransferError(EngineError):
    """A KV transfer could not complete."""

    error_type = "KVTransferError"


class HandshakeError(TransferError):
    """Two endpoints refused to pair (incompatible layouts, unknown peer, bad hello).

    `field` names the layout field that differed when that was the cause.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, param=field)
        self.field = field


class TransferTimeout(TransferError):
    """The transfer did not finish before its deadline."""


class TransferAborted(TransferError):
    """The transfer was aborted, locally or by the peer."""


class PeerLostError(TransferError):
    """The link to the peer broke (peer died, connection reset, channel closed)."""


class ProtocolError(TransferError):
    """The peer sent a frame this side cannot understand."""


class BlockSetError(TransferError):
    """A block set's ids, shape, dtype or device do not match what was agreed."""
