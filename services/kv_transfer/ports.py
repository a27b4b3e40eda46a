"""Listening sockets inside a configured port range, and the host to bind when none is configured.

Lifecycle: a listener (a KV transport, the router's reservation inbox) calls
`listen(host, port_range)` once at start; firewalls between Ray nodes often
open only a range, so the port is the first free one in it (or any, when no
range is set).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from pdserve.kv_transfer.errors import TransferError
from pdserve.shared.config import KVTransferConfig

PortRange = tuple[int, int]


class NoFreePortError(TransferError):
    """Every port of the configured range is taken."""


def candidate_ports(port_range: PortRange | None) -> Iterator[int]:
    """The ports to try in order; 0 (the OS picks) when no range is set."""
    if port_range is None:
        yield 0
        return
    low, high = port_range
    yield from range(low, high + 1)


def listen(host: str, port_range: PortRange | None, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on `host`, on the first free port of `port_range`."""
    last: OSError | None = None
    for port in candidate_ports(port_range):
        try:
            return socket.create_server((host, port), backlog=backlog)
        except OSError as exc:  # taken (EADDRINUSE); try the next one
            last = exc
    raise NoFreePortError(f"no free port on {host} in {port_range}: {last}")


def node_address() -> str:
    """This node's address as Ray knows it (routable from the other nodes); loopback outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # the transports work without Ray (tests, a bare engine)
        pass
    return "127.0.0.1"


def resolve_hosts(kv: KVTransferConfig, node_address: str) -> KVTransferConfig:
    """The config with the addresses this instance binds and advertises filled in for its node."""
    bind = kv.bind_host or node_address
    advertise = kv.advertise_host or (node_address if bind in ("0.0.0.0", "::") else bind)
    return kv.model_copy(update={"bind_host": bind, "advertise_host": advertise})
