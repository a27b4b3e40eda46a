"""A prompt's block hashes, computed the way vLLM's prefix cache computes them, without vLLM.

The precise prefix index is keyed by the hashes engines publish in their KV
events (`BlockStored.block_hashes`), so the router must derive the same keys
from a prompt's token ids. vLLM (0.32, `vllm/v1/core/kv_cache_utils.py`):

  NONE_HASH   = H(seed)       seed: $PYTHONHASHSEED if set, else "vllm-none-hash"
  block_0     = H((NONE_HASH, tuple(tokens[0:bs]), None))
  block_i     = H((block_{i-1}, tuple(tokens[i*bs:(i+1)*bs]), None))

for full blocks only, with H the configured `prefix_caching_hash_algo`
(`sha256`: SHA-256 of the pickled tuple; `sha256_cbor`: of canonical CBOR).
Events carry the hash as an int (its low 64 bits, the default
`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`) or as the raw bytes; `block_key`
maps both to the same 64-bit key. The extra keys (LoRA, multimodal,
cache_salt) are None for the plain token prompts pdserve sends.

xxhash variants use a random per-process seed unless PYTHONHASHSEED is set,
so only the SHA-256 ones are offered: with them every engine and the router
agree without configuration.
"""

from __future__ import annotations

import enum
import hashlib
import pickle
from typing import Any, Callable, Sequence

# vLLM's default seed for the first block's parent, when PYTHONHASHSEED is unset.
DEFAULT_SEED = "vllm-none-hash"
_MASK64 = (1 << 64) - 1


class HashAlgo(str, enum.Enum):
    """vLLM's `prefix_caching_hash_algo` values the router can reproduce."""

    SHA256 = "sha256"
    SHA256_CBOR = "sha256_cbor"


def _sha256_pickle(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(value: Any) -> bytes:
    import cbor2  # vLLM's own dependency; only needed for this algorithm

    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


_FUNCTIONS: dict[HashAlgo, Callable[[Any], bytes]] = {
    HashAlgo.SHA256: _sha256_pickle,
    HashAlgo.SHA256_CBOR: _sha256_cbor,
}


def block_key(block_hash: bytes | int) -> int:
    """The index key of a block hash as an event carries it (int or bytes): its low 64 bits."""
    if isinstance(block_hash, int):
        return block_hash & _MASK64
    return int.from_bytes(block_hash, "big") & _MASK64


class BlockHasher:
    """Keys of a prompt's full blocks, chained like vLLM's request block hasher."""

    def __init__(self, algo: HashAlgo = HashAlgo.SHA256, seed: str | None = None) -> None:
        self.algo = HashAlgo(algo)
        self._fn = _FUNCTIONS[self.algo]
        self.none_hash = self._fn(seed if seed is not None else DEFAULT_SEED)

    def hash_blocks(self, token_ids: Sequence[int], block_size: int) -> list[bytes]:
        """Raw hashes of every full block of `token_ids` (a partial last block has none)."""
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        out: list[bytes] = []
        parent = self.none_hash
        for start in range(0, len(token_ids) - block_size + 1, block_size):
            parent = self._fn((parent, tuple(int(t) for t in token_ids[start:start + block_size]), None))
            out.append(parent)
        return out

    def keys(self, token_ids: Sequence[int], block_size: int) -> list[int]:
        """Index keys of every full block of `token_ids`, in prompt order."""
        return [block_key(h) for h in self.hash_blocks(token_ids, block_size)]

    def first_block_key(self, token_ids: Sequence[int]) -> int:
        """The key of a first block with these tokens (to check an engine's events agree with us)."""
        return block_key(self._fn((self.none_hash, tuple(int(t) for t in token_ids), None)))
