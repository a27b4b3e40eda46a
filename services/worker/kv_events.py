"""Where an engine publishes its KV-cache events (vLLM's `kv_events_config`) for the router's prefix index.

vLLM's ZMQ publisher binds an endpoint only when it holds a wildcard
(`tcp://*:PORT`), and it binds the PUB socket and the replay ROUTER socket
in the engine-core process, where the worker cannot read the ports back. So
the worker picks two free ports on its node (in the configured port range,
if any), hands vLLM the wildcard endpoints, and advertises the node's
address with those ports in its `EngineInfo`. Between picking a port and the
engine binding it another process could take it: the engine then fails to
start, which the controller sees and retries like any failed start.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.kv_transfer.ports import PortRange, listen


@dataclass(frozen=True)
class EventEndpoints:
    """What the engine binds and what the router dials."""

    publish_port: int
    replay_port: int
    advertise_host: str

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.advertise_host}:{self.publish_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://{self.advertise_host}:{self.replay_port}"

    def vllm_config(self, topic: str) -> dict:
        """vLLM's `kv_events_config` (as a mapping `AsyncEngineArgs` accepts)."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.publish_port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
            "topic": topic,
        }


def pick_endpoints(advertise_host: str, port_range: PortRange | None = None) -> EventEndpoints:
    """Two free ports on this node for the engine's event publisher and its replay socket."""
    held = [listen("0.0.0.0", port_range), listen("0.0.0.0", port_range)]  # both held at once: two distinct ports
    try:
        ports = [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()
    return EventEndpoints(ports[0], ports[1], advertise_host)
