"""The KV transfer layer: moves a request's KV blocks between instances, layer by layer.

Lifecycle: each engine worker builds one transport (`make_transport`) for
its KV layout, starts it (it listens on OS-assigned ports and registers its
endpoint), and then opens senders (prefill side) and receivers (decode side)
per transfer; pairs of instances connect lazily, on their first transfer,
after a handshake that refuses incompatible layouts. `base` holds the
interface, `transport`/`link`/`transfer` the machinery every transport shares,
and `tcp`, `torchdist` (gloo), `nccl` and `loopback` the wires.
"""

from __future__ import annotations

from pdserve.kv_transfer.base import KVReceiver, KVSender, KVTransfer, KVTransport, TransferState
from pdserve.kv_transfer.config import TransportConfig
from pdserve.kv_transfer.errors import (BlockSetError, HandshakeError, PeerLostError, ProtocolError, TransferAborted,
                                        TransferError, TransferTimeout)
from pdserve.kv_transfer.factory import TRANSPORT_KINDS, make_transport
from pdserve.kv_transfer.faults import FaultPlan
from pdserve.kv_transfer.layout import EndpointInfo, KVLayout
from pdserve.kv_transfer.registry import EndpointDirectory, EndpointRegistry

__all__ = [
    "BlockSetError", "EndpointDirectory", "EndpointInfo", "EndpointRegistry", "FaultPlan", "HandshakeError",
    "KVLayout", "KVReceiver", "KVSender", "KVTransfer", "KVTransport", "PeerLostError", "ProtocolError",
    "TRANSPORT_KINDS", "TransferAborted", "TransferError", "TransferState", "TransferTimeout", "TransportConfig",
    "make_transport",
]
