"""The endpoint registry: who can be reached where, with which KV layout.

Lifecycle: each transport registers its `EndpointInfo` when it starts and
unregisters when it closes. A sender's transport resolves a peer through
`pair(local, peer_id)` on first use (lazy connect); the registry refuses the
pair up front when the layouts differ, and the peer repeats the check at the
handshake (the registry may be stale). The in-memory `EndpointRegistry`
serves one process and the tests; the controller will implement the same
`EndpointDirectory` protocol as a Ray actor.
"""

from __future__ import annotations

import threading
from typing import Protocol

from pdserve.kv_transfer.errors import HandshakeError
from pdserve.kv_transfer.layout import EndpointInfo


class EndpointDirectory(Protocol):
    def register(self, info: EndpointInfo) -> None: ...
    def unregister(self, instance_id: str, address: str | None = None) -> None: ...
    def lookup(self, instance_id: str) -> EndpointInfo: ...


class EndpointRegistry:
    """Thread-safe in-memory directory: instance id -> EndpointInfo."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._endpoints: dict[str, EndpointInfo] = {}

    def register(self, info: EndpointInfo) -> None:
        """Add or replace (a restarted instance comes back at a new address)."""
        with self._lock:
            self._endpoints[info.instance_id] = info

    def unregister(self, instance_id: str, address: str | None = None) -> None:
        """Forget an endpoint; with `address`, only if it still is that one (a successor may have replaced it)."""
        with self._lock:
            current = self._endpoints.get(instance_id)
            if current is not None and (address is None or current.address == address):
                del self._endpoints[instance_id]

    def lookup(self, instance_id: str) -> EndpointInfo:
        with self._lock:
            info = self._endpoints.get(instance_id)
        if info is None:
            raise HandshakeError(f"no KV endpoint registered for instance {instance_id!r}")
        return info

    def pair(self, local: EndpointInfo, peer_id: str) -> EndpointInfo:
        """The peer's endpoint, after checking it can pair with `local` (HandshakeError if not)."""
        if peer_id == local.instance_id:
            raise HandshakeError(f"instance {peer_id!r} cannot transfer KV to itself")
        peer = self.lookup(peer_id)
        local.check_compatible(peer)
        return peer

    def endpoints(self) -> list[EndpointInfo]:
        with self._lock:
            return list(self._endpoints.values())
