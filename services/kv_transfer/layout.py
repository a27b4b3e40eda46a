"""KV layouts and transfer endpoints, and the compatibility check of a handshake.

Lifecycle: every instance builds one `KVLayout` from its engine configuration
and publishes an `EndpointInfo` (layout + transport kind + address) when its
transport starts. At handshake each side calls `check_compatible` on the
other's info; a mismatch raises `HandshakeError` naming the field, so an
operator sees "dtype differs: bfloat16 here, float16 at peer" rather than a
garbled cache later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.kv_transfer.errors import HandshakeError

# Fields that must agree for two instances to exchange KV blocks. tp_rank is
# among them because rank r of a prefill instance pairs with rank r of its
# decode instance: blocks hold only that rank's share of the KV heads.
_PAIRING_FIELDS = ("model", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size", "tp_rank")


def dtype_from_name(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; ValueError for a name that is no dtype."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    """The shape of one instance's KV cache, as far as a peer must know it."""

    model: str = field(metadata={"description": "Model identity (name or path) that produced the KV."})
    dtype: str = field(metadata={"description": "KV cache dtype, torch name without prefix (e.g. 'bfloat16')."})
    block_size: int = field(metadata={"description": "Tokens per KV block."})
    num_layers: int = field(metadata={"description": "Attention layers; a block set carries one tensor per layer."})
    num_kv_heads: int = field(metadata={"description": "KV heads of the whole model (before tensor parallel split)."})
    head_dim: int = field(metadata={"description": "Size of one attention head."})
    tp_size: int = field(default=1, metadata={"description": "Tensor-parallel degree of the instance."})
    tp_rank: int = field(default=0, metadata={"description": "This worker's tensor-parallel rank."})

    def __post_init__(self) -> None:
        dtype_from_name(self.dtype)
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        if self.num_kv_heads % self.tp_size:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} not divisible by tp_size {self.tp_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block of one layer on this rank: (K and V, tokens, heads, head_dim)."""
        return (2, self.block_size, self.num_kv_heads // self.tp_size, self.head_dim)

    def block_set_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's tensor for a block set of `num_blocks` blocks."""
        return (num_blocks, *self.block_shape)

    def check_compatible(self, other: KVLayout, *, here: str = "here", there: str = "peer") -> None:
        """Raise HandshakeError naming the first field on which `other` differs.

        `here`/`there` label the two sides in the message (instance ids), so
        the text reads the same whichever side logs it.
        """
        for name in _PAIRING_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise HandshakeError(
                    f"KV layouts are incompatible: {name} differs ({mine!r} at {here}, {theirs!r} at {there})",
                    field=name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise HandshakeError(f"malformed KV layout from peer: {exc}") from exc


@dataclass(frozen=True)
class EndpointInfo:
    """What an instance publishes so that peers can reach its transport."""

    instance_id: str = field(metadata={"description": "Unique id of the engine instance (and TP rank) owning the endpoint."})
    layout: KVLayout = field(metadata={"description": "The instance's KV layout, checked at handshake."})
    transport: str = field(metadata={"description": "Transport kind ('tcp', 'gloo', 'nccl', 'loopback'); both sides must match."})
    address: str = field(metadata={"description": "Where the transport listens, e.g. 'tcp://10.0.0.5:41234' (OS-assigned port)."})

    def check_compatible(self, other: EndpointInfo) -> None:
        """Raise HandshakeError if `other` cannot pair with this endpoint."""
        if self.transport != other.transport:
            raise HandshakeError(
                f"transports are incompatible: transport differs ({self.transport!r} at {self.instance_id}, "
                f"{other.transport!r} at {other.instance_id})", field="transport")
        self.layout.check_compatible(other.layout, here=self.instance_id, there=other.instance_id)

    def to_dict(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "layout": self.layout.to_dict(),
                "transport": self.transport, "address": self.address}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointInfo:
        try:
            return cls(instance_id=str(data["instance_id"]), layout=KVLayout.from_dict(data["layout"]),
                       transport=str(data["transport"]), address=str(data["address"]))
        except (KeyError, TypeError) as exc:
            raise HandshakeError(f"malformed endpoint info from peer: {exc!r}") from exc
