"""The pairing handshake, run over a fresh channel before it becomes a link.

Lifecycle: the dialer sends HELLO with its EndpointInfo; the acceptor checks
compatibility and answers WELCOME (with transport-specific details, e.g. where
to form a process group) or REFUSE (with the reason and the differing field),
then closes. A refusal reaches the dialer as HandshakeError carrying the
acceptor's message, so the operator reads the same text on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdserve.kv_transfer.channel import Channel
from pdserve.kv_transfer.errors import HandshakeError, ProtocolError
from pdserve.kv_transfer.frames import Frame, FrameKind
from pdserve.kv_transfer.layout import EndpointInfo


def dial(channel: Channel, local: EndpointInfo, timeout_s: float) -> dict[str, Any]:
    """Introduce `local` to the acceptor; returns the WELCOME details or raises HandshakeError."""
    channel.set_timeout(timeout_s)
    channel.send(Frame(FrameKind.HELLO, {"endpoint": local.to_dict()}))
    reply = channel.recv_frame()
    if reply.kind is FrameKind.REFUSE:
        field = reply.meta.get("field")
        raise HandshakeError(f"peer refused the pair: {reply.meta.get('message', 'no reason given')}",
                             field=field if isinstance(field, str) else None)
    if reply.kind is not FrameKind.WELCOME:
        raise ProtocolError(f"expected WELCOME or REFUSE, got {reply.kind.name}")
    channel.set_timeout(None)
    return reply.meta


def accept(channel: Channel, local: EndpointInfo, timeout_s: float,
           welcome: Callable[[EndpointInfo], dict[str, Any]]) -> tuple[EndpointInfo, dict[str, Any]]:
    """Answer a dialer: returns its EndpointInfo and the WELCOME details sent, or raises (after REFUSE)."""
    channel.set_timeout(timeout_s)
    hello = channel.recv_frame()
    if hello.kind is not FrameKind.HELLO:
        raise ProtocolError(f"expected HELLO, got {hello.kind.name}")
    endpoint = hello.meta.get("endpoint")
    if not isinstance(endpoint, dict):
        raise ProtocolError("HELLO lacks the dialer's endpoint")
    try:
        peer = EndpointInfo.from_dict(endpoint)
        local.check_compatible(peer)
    except HandshakeError as exc:
        channel.send(Frame(FrameKind.REFUSE, {"message": str(exc), "field": exc.field}))
        raise
    details = welcome(peer)
    channel.send(Frame(FrameKind.WELCOME, details))
    channel.set_timeout(None)
    return peer, details
