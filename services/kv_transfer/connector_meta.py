"""What the P/D connector's scheduler side tells its worker side, step by step.

Lifecycle: the scheduler side (`connector_scheduler`) turns handoff params
(`params`) into per-step instructions, `PDConnectorMetadata`: blocks to
receive into (`LoadSpec`), blocks to send (`SendSpec`), first tokens to send
after the KV (`TokenSpec`), transfers to abort. At start-up each worker rank
tells the scheduler side its transport endpoint (`EndpointHandshake`); D's
reservations carry them, one per tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata, KVConnectorMetadata


@dataclass
class LoadSpec:
    """D: receive transfer `transfer_id` into `block_ids` for request `req_id`."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    timeout_s: float


@dataclass
class SendSpec:
    """P: push `local_block_ids` (this step computes the prompt's last chunk) to D's `remote_block_ids`."""

    req_id: str
    transfer_id: str
    peer_endpoints: list[dict[str, Any]]  # D's, by TP rank: each rank of P sends to its own
    local_block_ids: list[int]
    remote_block_ids: list[int]
    timeout_s: float
    skipped_blocks: int = 0  # leading prompt blocks D held already (its prefix cache): not sent, counted as saved


@dataclass
class TokenSpec:
    """P: the tokens the prefill sampled for `req_id` follow its KV to D (D continues from them)."""

    req_id: str
    token_ids: list[int]


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    """One step's instructions from the scheduler side to the worker side."""

    loads: list[LoadSpec] = field(default_factory=list)
    sends: list[SendSpec] = field(default_factory=list)
    tokens: list[TokenSpec] = field(default_factory=list)
    abort_loads: list[str] = field(default_factory=list)  # request ids whose receive must stop
    abort_sends: list[str] = field(default_factory=list)  # request ids whose send must stop
    # Migration out (`kv_transfer.migration`): stopped requests whose blocks go now, from storage (no
    # forward computes them), and stopped requests whose held blocks are freed without a send.
    migrations: list[SendSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)


@dataclass
class EndpointHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler at start-up: the transport endpoint D advertises in reservations."""

    endpoint: dict[str, Any]
