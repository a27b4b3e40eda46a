"""Configuration of a KV transport.

Lifecycle: built once per instance (from pdserve's config tree later) and
passed to the transport's constructor; immutable afterwards.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TransportConfig(BaseModel):
    """Knobs shared by every transport; the defaults suit one host and CI."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bind_host: str = Field("127.0.0.1", description="Interface the transport listens on; '0.0.0.0' for every interface.")
    advertise_host: str | None = Field(
        None, description="Host peers dial; default: bind_host (set it when binding 0.0.0.0).")
    connect_timeout_s: float = Field(10.0, gt=0, description="Limit on dialing a peer and completing the handshake.")
    transfer_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of a transfer when its opener gives none; on expiry both sides end TIMED_OUT.")
    send_timeout_s: float = Field(
        10.0, gt=0, description="A send that makes no progress this long (a frozen or vanished peer) breaks the "
                                "link: its transfers fail and their blocks are freed.")
    socket_buffer_bytes: int | None = Field(
        None, gt=0, description="SO_SNDBUF/SO_RCVBUF for data sockets; default: the kernel's autotuning.")
    finished_memory: int = Field(
        4096, gt=0, description="Finished transfer ids remembered, so late frames for them are discarded, not staged.")

    @property
    def host_for_peers(self) -> str:
        return self.advertise_host or self.bind_host
