"""Moving a request's blocks between vLLM's paged KV tensor and the wire format.

Lifecycle: the connector's worker side wraps each layer's KV tensor in a
`PagedKV` once, in `register_kv_caches`. On the prefill side, `gather` copies a
request's blocks out of the layer (one copy, straight into the wire layout)
when the layer has been computed; on the decode side `scatter` copies a
received block set into the blocks the scheduler reserved.

The wire layout is the transport's `KVLayout.block_set_shape`:
(blocks, K/V, tokens, kv heads, head dim). vLLM's backends keep blocks in
different memory orders; converting at the edge means two instances with
different backends (CPU here, a GPU backend elsewhere) still exchange the same
bytes, and the transport's shape check means something.

Memory orders understood:

- ``cpu``: vLLM's CPU attention backend, ``[num_blocks, kv_heads, block_size,
  2 * head_dim]``; each (block, head) row holds the block's keys for every
  token followed by its values (the backend views it as
  ``[.., 2 * block_size, head_dim]`` and splits it in two).
- ``kv_first``: ``[2, num_blocks, block_size, kv_heads, head_dim]`` (flash-style
  GPU backends).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.kv_transfer.errors import BlockSetError

MEMORY_ORDERS = ("cpu", "kv_first")


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged KV tensor, seen in the wire order (a view: no copy)."""

    canonical: torch.Tensor  # [num_blocks, 2, block_size, kv_heads, head_dim], usually non-contiguous
    order: str

    @property
    def num_blocks(self) -> int:
        return int(self.canonical.shape[0])

    @property
    def block_shape(self) -> tuple[int, ...]:
        return tuple(self.canonical.shape[1:])


def wrap_layer(kv: torch.Tensor, order: str, block_size: int, num_kv_heads: int, head_dim: int) -> PagedKV:
    """A `PagedKV` over `kv`, after checking its shape is what `order` promises.

    The check matters: a silent mismatch would ship garbage that decodes to
    plausible-looking but wrong tokens.
    """
    if order == "cpu":
        expected = (kv.shape[0], num_kv_heads, block_size, 2 * head_dim)
        if tuple(kv.shape) != expected:
            raise BlockSetError(f"CPU KV tensor has shape {tuple(kv.shape)}, expected {expected}")
        # [N, H, 2*bs*hd] rows -> [N, H, 2, bs, hd] -> [N, 2, bs, H, hd]
        view = kv.view(kv.shape[0], num_kv_heads, 2, block_size, head_dim).permute(0, 2, 3, 1, 4)
        return PagedKV(view, order)
    if order == "kv_first":
        expected = (2, kv.shape[1], block_size, num_kv_heads, head_dim)
        if tuple(kv.shape) != expected:
            raise BlockSetError(f"KV tensor has shape {tuple(kv.shape)}, expected {expected}")
        return PagedKV(kv.permute(1, 0, 2, 3, 4), order)
    raise BlockSetError(f"unknown KV memory order {order!r}; known: {', '.join(MEMORY_ORDERS)}")


def _index(block_ids: Sequence[int], paged: PagedKV) -> torch.Tensor:
    ids = torch.as_tensor(list(block_ids), dtype=torch.long, device=paged.canonical.device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= paged.num_blocks):
        raise BlockSetError(f"block ids {list(block_ids)[:8]}... outside 0..{paged.num_blocks - 1}")
    return ids


def gather(paged: PagedKV, block_ids: Sequence[int]) -> torch.Tensor:
    """A new contiguous tensor [len(block_ids), 2, block_size, heads, head_dim] of those blocks.

    `index_select` writes its result contiguously whatever the source strides,
    so the reorder and the gather are one copy.
    """
    return torch.index_select(paged.canonical, 0, _index(block_ids, paged))


def scatter(paged: PagedKV, block_ids: Sequence[int], block_set: torch.Tensor) -> None:
    """Copy a received block set into the given blocks of the paged tensor, in place."""
    expected = (len(block_ids), *paged.block_shape)
    if tuple(block_set.shape) != expected or block_set.dtype != paged.canonical.dtype:
        raise BlockSetError(f"block set {block_set.dtype}{tuple(block_set.shape)} does not fit "
                            f"{paged.canonical.dtype}{expected}")
    paged.canonical.index_copy_(0, _index(block_ids, paged), block_set)


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """How many blocks hold `num_tokens` tokens (the last one possibly partial)."""
    return -(-num_tokens // block_size)
