"""Configuration of a KV transport.

Lifecycle: built once per instance from pdserve's `KVTransferConfig`
(`connector.transport_config`) and passed to the transport's constructor;
immutable afterwards. Defaults are the config tree's, so a transport built
bare (tests, tools) behaves like a served one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pdserve.shared.config import KVTransferConfig

_KV = KVTransferConfig.model_fields


def _same_as_config(name: str, **rules: float) -> object:
    """A field whose default and description are the config tree's (one source)."""
    return Field(_KV[name].default, description=_KV[name].description, **rules)  # type: ignore[arg-type]


class TransportConfig(BaseModel):
    """Knobs shared by every transport; the defaults suit one host and CI."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bind_host: str = Field("127.0.0.1", description="Interface the transport listens on; '0.0.0.0' for every interface.")
    advertise_host: str | None = Field(
        None, description="Host peers dial; default: bind_host (set it when binding 0.0.0.0).")
    connect_timeout_s: float = _same_as_config("connect_timeout_s", gt=0)  # type: ignore[assignment]
    transfer_timeout_s: float = _same_as_config("transfer_timeout_s", gt=0)  # type: ignore[assignment]
    send_timeout_s: float = _same_as_config("send_timeout_s", gt=0)  # type: ignore[assignment]
    port_range: tuple[int, int] | None = _same_as_config("port_range")  # type: ignore[assignment]
    socket_buffer_bytes: int | None = Field(
        None, gt=0, description="SO_SNDBUF/SO_RCVBUF for data sockets; default: the kernel's autotuning.")
    finished_memory: int = Field(
        4096, gt=0, description="Finished transfer ids remembered, so late frames for them are discarded, not staged.")

    @property
    def host_for_peers(self) -> str:
        return self.advertise_host or self.bind_host
