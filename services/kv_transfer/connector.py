"""pdserve's vLLM KV connector: prefill (P) pushes a prompt's KV, layer by layer, into blocks decode (D) reserved.

Plugged in with
    kv_transfer_config = {
        "kv_connector": "PDConnector",
        "kv_connector_module_path": "pdserve.kv_transfer.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",  # a failed handoff recomputes on D
        "kv_connector_extra_config": {
            "pdserve": KVTransferConfig(...).model_dump(mode="json"),  # the whole typed config, hosts resolved
            "instance_id": "decode-0",                                  # default: the engine id
        },
    }

Lifecycle of a request through P and D (the controller's part in brackets):

1. [controller -> D] the request, kv_transfer_params = DecodeParams(transfer_id).
2. D scheduler side: prompt tokens but the last are external, loaded
   asynchronously; vLLM reserves blocks and parks the request; a
   `Reservation` (D's endpoints by TP rank, D's block ids) goes to the
   router's inbox over TCP (`reservations`). D worker side: opens a receiver
   for those blocks.
3. [controller takes the reservation -> P] the request with
   `reservation.prefill_params()`, max_tokens=1 (P's token is the first token
   the client sees).
4. P computes the prompt; in the step that computes its last chunk, each
   attention layer's blocks are queued on the transport as soon as that layer
   is done (the wire overlaps the following layers' compute).
5. D's receiver completes: the worker copies every layer into the reserved
   blocks and reports the request finished receiving; vLLM schedules it and
   decodes (recomputing only the last prompt token). On failure, abort or
   timeout the request is reported failed instead, vLLM recomputes the prompt,
   and `recv_failed` counts it (in vLLM's KV-connector stats).
6. P's blocks: `request_finished` keeps them until the send ends (either
   way); the worker then reports finished-sending and vLLM frees them. D's
   blocks are vLLM's to free when the request ends. An abort on either side
   aborts the transfer on both.

The scheduler side (`connector_scheduler`) and worker side
(`connector_worker`) run in the same engine-core process or not; they share
only the per-step `PDConnectorMetadata` and the start-up handshake metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorHandshakeMetadata,
                                                               KVConnectorMetadata, KVConnectorRole,
                                                               KVConnectorTransferResults)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from pydantic import ValidationError

from pdserve.kv_transfer.config import TransportConfig
from pdserve.kv_transfer.connector_meta import EndpointHandshake, PDConnectorMetadata
from pdserve.kv_transfer.connector_scheduler import PDSchedulerSide
from pdserve.kv_transfer.connector_worker import PDWorkerSide
from pdserve.kv_transfer.errors import TransferError
from pdserve.kv_transfer.reservations import ReservationPoster
from pdserve.shared.config import KVTransferConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class ConnectorConfigError(TransferError):
    """The connector's kv_connector_extra_config is unusable."""


@dataclass
class PDTransferStats(KVConnectorStats):
    """Counters of one interval: receives done/failed (failed = recomputed on D), sends done/failed, bytes sent."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


EXTRA_KEY = "pdserve"  # kv_connector_extra_config key holding the KVTransferConfig


def connector_settings(vllm_config: VllmConfig) -> tuple[KVTransferConfig, str]:
    """pdserve's KV transfer config (the one typed source of every knob) and this instance's id."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    try:
        config = KVTransferConfig.model_validate(extra.get(EXTRA_KEY) or {})
    except ValidationError as exc:
        raise ConnectorConfigError(f"kv_connector_extra_config[{EXTRA_KEY!r}] is invalid: {exc}") from exc
    return config, str(extra.get("instance_id") or vllm_config.kv_transfer_config.engine_id)


def transport_config(kv: KVTransferConfig) -> TransportConfig:
    """The transport's knobs, all taken from the KV transfer config (hosts resolved by the worker)."""
    return TransportConfig(transfer_timeout_s=kv.transfer_timeout_s, bind_host=kv.bind_host or "127.0.0.1",
                           advertise_host=kv.advertise_host, port_range=kv.port_range,
                           connect_timeout_s=kv.connect_timeout_s, send_timeout_s=kv.send_timeout_s)


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
    try:
        return get_tensor_model_parallel_rank()
    except AssertionError:  # groups not initialised (a unit test building the worker side alone)
        return 0


def endpoints_by_rank(metadata: dict[int, KVConnectorHandshakeMetadata], tp_size: int) -> list[dict[str, Any]] | None:
    """Every rank's transport endpoint in rank order; None (D cannot receive KV) if a rank is missing."""
    found = {rank: m.endpoint for rank, m in metadata.items() if isinstance(m, EndpointHandshake)}
    if sorted(found) != list(range(tp_size)):
        log.error("KV endpoints known for ranks %s of %d: this instance will not receive KV", sorted(found), tp_size)
        return None
    return [found[rank] for rank in range(tp_size)]


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        kv, instance = connector_settings(vllm_config)
        block_size = vllm_config.cache_config.block_size
        self._scheduler: PDSchedulerSide | None = None
        self._worker: PDWorkerSide | None = None
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        if role == KVConnectorRole.SCHEDULER:
            poster = ReservationPoster(kv.connect_timeout_s, kv.connect_timeout_s)
            self._scheduler = PDSchedulerSide(block_size, poster, kv.transfer_timeout_s)
            return
        parallel = vllm_config.parallel_config
        tp_rank = _tp_rank()
        if parallel.tensor_parallel_size > 1:
            instance = f"{instance}-tp{tp_rank}"  # one transport per rank: rank r of P pairs with rank r of D
        self._worker = PDWorkerSide(
            instance_id=instance, model=str(vllm_config.model_config.model), block_size=block_size,
            head_dim=vllm_config.model_config.get_head_size(), tp_size=parallel.tensor_parallel_size,
            tp_rank=tp_rank, transport_kind=kv.transport, config=transport_config(kv))

    # ==== worker side ===================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._worker.handshake_metadata() if self._worker is not None else None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # Sends must exist before the forward's first save_kv_layer, and vLLM
        # may call start_load_kv only after the forward: act on binding.
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None and isinstance(connector_metadata, PDConnectorMetadata)
        self._worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return  # receives were opened on binding; landing happens in get_transfer_results

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # D never runs a forward over blocks still in flight: the request waits in the scheduler

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        return  # sends are asynchronous; P's blocks are held until get_transfer_results reports them

    # get_finished is deliberately not overridden: it cannot say "finished but
    # failed", and reporting a failed receive as finished would make vLLM decode
    # over blocks that never got their KV. vLLM 0.32 calls get_transfer_results.
    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving, failed = self._worker.transfer_results(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        counts = self._worker.take_counters()
        return PDTransferStats(data=counts) if counts else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PDTransferStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None and self._scheduler.poster is not None:
            self._scheduler.poster.close()

    # ==== scheduler side ================================================================
    @property
    def scheduler_side(self) -> PDSchedulerSide | None:
        """The scheduler side's state (the migration utilities in the engine core act on it)."""
        return self._scheduler

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        assert self._scheduler is not None
        self._scheduler.endpoints = endpoints_by_rank(metadata, self._tp_size)

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        assert self._scheduler is not None
        self._scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_push_work()

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))  # we move the request's own blocks
