"""The wire format: one fixed prefix, a JSON header, then the raw tensor bytes.

Lifecycle: a `Frame` is built by a link or the handshake, encoded by a
channel, decoded on the other side, and dispatched by kind. Every frame is

    magic b"PDKV" | kind u8 | header length u32 | payload length u64 | header JSON | payload

Length-prefixing lets a reader receive the payload straight into a tensor the
receiver posted (no intermediate buffer), and skip it when nobody wants it.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from pdserve.kv_transfer.errors import ProtocolError

MAGIC = b"PDKV"
PREFIX = struct.Struct("!4sBIQ")
# A header is a few hundred bytes plus the block ids; 64 MiB is far beyond any
# sane block list and stops a corrupt length from allocating the machine away.
MAX_HEADER_BYTES = 64 << 20


class FrameKind(enum.IntEnum):
    HELLO = 1    # dialer -> acceptor: my EndpointInfo
    WELCOME = 2  # acceptor -> dialer: pair accepted (plus transport-specific details)
    REFUSE = 3   # acceptor -> dialer: pair refused, with the reason
    DATA = 4     # sender -> receiver: one layer of one transfer's block set
    DONE = 5     # receiver -> sender: every layer landed
    ABORT = 6    # either way: the transfer ended (aborted, timed out or failed) on the writer's side
    TOKEN = 7    # sender -> receiver: the tokens sampled from the transfer's KV (after its last layer)


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    meta: dict[str, Any] = field(default_factory=dict)
    payload_nbytes: int = 0

    def encode_header(self) -> bytes:
        """Prefix plus JSON header; the payload follows separately (zero-copy)."""
        body = json.dumps(self.meta, separators=(",", ":")).encode()
        return PREFIX.pack(MAGIC, int(self.kind), len(body), self.payload_nbytes) + body


def decode_prefix(raw: bytes) -> tuple[FrameKind, int, int]:
    """Validate the fixed prefix; returns (kind, header length, payload length)."""
    magic, kind, header_len, payload_len = PREFIX.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}: peer is not a pdserve KV transport")
    try:
        frame_kind = FrameKind(kind)
    except ValueError as exc:
        raise ProtocolError(f"unknown frame kind {kind}") from exc
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    return frame_kind, header_len, payload_len


def decode_header(kind: FrameKind, body: bytes, payload_len: int) -> Frame:
    try:
        meta = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"undecodable {kind.name} header: {exc}") from exc
    if not isinstance(meta, dict):
        raise ProtocolError(f"{kind.name} header is not an object")
    return Frame(kind, meta, payload_len)


def meta_field(frame: Frame, name: str, kind: type) -> Any:
    """Read a required header field of the given type, or raise ProtocolError."""
    value = frame.meta.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{frame.kind.name} frame lacks a valid {name!r}: {value!r}")
    return value
