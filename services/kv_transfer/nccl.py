"""The NCCL transport: the pairwise process-group transport with GPU tensors.

Lifecycle: as `TorchDistTransport` (control socket + TCPStore + two-rank group
formed at handshake), with the group built by ProcessGroupNCCL on this
transport's CUDA device. Block-set tensors, posted buffers and staging live on
that device; a layer counts as landed once the receiving stream synchronised.
Two ranks need two GPUs (NCCL refuses two ranks on one device), so this runs
only where there are at least two.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from pdserve.kv_transfer.config import TransportConfig
from pdserve.kv_transfer.errors import TransferError
from pdserve.kv_transfer.layout import KVLayout
from pdserve.kv_transfer.registry import EndpointRegistry
from pdserve.kv_transfer.torchdist import TorchDistTransport


def nccl_available() -> bool:
    return torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()


class NcclTransport(TorchDistTransport):
    kind = "nccl"
    backend = "nccl"

    def __init__(self, instance_id: str, layout: KVLayout, registry: EndpointRegistry,
                 device: torch.device | str | int, config: TransportConfig | None = None) -> None:
        if not nccl_available():
            raise TransferError("NCCL transport needs CUDA and a torch build with NCCL")
        super().__init__(instance_id, layout, registry, config)
        chosen = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if chosen.type != "cuda":
            raise TransferError(f"NCCL transport needs a CUDA device, got {chosen}")
        self.device = chosen if chosen.index is not None else torch.device("cuda", torch.cuda.current_device())

    def _make_group(self, store: Any, rank: int) -> Any:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=self.config.transfer_timeout_s)
        # Each link thread runs on its own: make sure its NCCL calls target our device.
        torch.cuda.set_device(self.device)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
