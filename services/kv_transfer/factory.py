"""Building a transport by kind name, as configuration names it.

Lifecycle: called once per worker at start-up; imports the concrete module
lazily so that, e.g., a CPU worker never touches CUDA.
"""

from __future__ import annotations

from typing import Any

from pdserve.kv_transfer.base import KVTransport
from pdserve.kv_transfer.config import TransportConfig
from pdserve.kv_transfer.errors import TransferError
from pdserve.kv_transfer.layout import KVLayout
from pdserve.kv_transfer.registry import EndpointRegistry

TRANSPORT_KINDS = ("tcp", "gloo", "nccl", "loopback")


def make_transport(kind: str, instance_id: str, layout: KVLayout, registry: EndpointRegistry,
                   config: TransportConfig | None = None, **extra: Any) -> KVTransport:
    """`extra`: `fabric=` for loopback, `device=` for nccl."""
    if kind == "tcp":
        from pdserve.kv_transfer.tcp import TcpTransport
        return TcpTransport(instance_id, layout, registry, config)
    if kind == "gloo":
        from pdserve.kv_transfer.torchdist import GlooTransport
        return GlooTransport(instance_id, layout, registry, config)
    if kind == "nccl":
        from pdserve.kv_transfer.nccl import NcclTransport
        return NcclTransport(instance_id, layout, registry, extra.get("device", 0), config)
    if kind == "loopback":
        from pdserve.kv_transfer.loopback import LoopbackFabric, LoopbackTransport
        return LoopbackTransport(instance_id, layout, registry, extra.get("fabric") or LoopbackFabric(), config)
    raise TransferError(f"unknown KV transport {kind!r}; choose one of {', '.join(TRANSPORT_KINDS)}")
