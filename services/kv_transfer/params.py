"""What the router, D and P tell each other about one handoff; plain data, no vLLM.

Lifecycle of one handoff, as data:

1. The router sends the request to D first, with
   `kv_transfer_params = DecodeParams(transfer_id, reply_to).to_dict()` (in
   `SamplingParams.extra_args["kv_transfer_params"]`, where vLLM looks).
   `reply_to` is the address of the router's `ReservationInbox`
   (`kv_transfer.reservations`): the reservation goes back over TCP, so D
   and the router need no shared disk and may sit on different hosts.
2. D's scheduler side reserves blocks and posts a `Reservation` to
   `reply_to`: D's transport endpoints (one per tensor-parallel rank, each
   at an address P can route to), D's block ids, the token count.
3. The router sends the request to P with `reservation.prefill_params()`
   (a `PrefillParams` dict) and max_tokens=1; rank r of P pushes into rank r
   of D.

The router imports this module, the connector imports it too; it imports
nothing from vLLM (the per-step connector metadata lives in `connector_meta`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve.kv_transfer.errors import HandshakeError

PARAMS_KEY = "kv_transfer_params"  # the extra_args key vLLM reads into Request.kv_transfer_params


class ParamsError(HandshakeError):
    """kv_transfer_params (or a reservation) that name a P/D handoff but are malformed."""


def _require(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ParamsError(f"kv_transfer_params lacks a valid {name!r}: {value!r}")
    return value


def _block_ids(params: dict[str, Any], name: str) -> list[int]:
    ids = _require(params, name, list)
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in ids):
        raise ParamsError(f"kv_transfer_params {name} must be non-negative integers")
    return ids


def _endpoints(params: dict[str, Any]) -> list[dict[str, Any]]:
    endpoints = _require(params, "decode_endpoints", list)
    if not all(isinstance(e, dict) for e in endpoints):
        raise ParamsError("kv_transfer_params decode_endpoints must be endpoint mappings, one per rank")
    return endpoints


def _count(params: dict[str, Any], name: str) -> int:
    value = params.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ParamsError(f"kv_transfer_params {name} is not a count: {value!r}")
    return value


@dataclass(frozen=True)
class DecodeParams:
    """Params of the request on D: its prompt's KV will come from a prefill instance."""

    transfer_id: str
    reply_to: str | None = None  # "host:port" of the router's reservation inbox; None: no handoff possible
    timeout_s: float | None = None  # how long D waits for the KV before recomputing

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pd_remote_prefill": True, "transfer_id": self.transfer_id}
        if self.reply_to is not None:
            out["reply_to"] = self.reply_to
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> DecodeParams | None:
        """None unless `params` asks for a remote prefill."""
        if not params or not params.get("pd_remote_prefill"):
            return None
        timeout = params.get("timeout_s")
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)):
            raise ParamsError(f"kv_transfer_params timeout_s is not a number: {timeout!r}")
        reply_to = params.get("reply_to")
        if reply_to is not None and not isinstance(reply_to, str):
            raise ParamsError(f"kv_transfer_params reply_to is not an address: {reply_to!r}")
        return cls(_require(params, "transfer_id", str), reply_to, float(timeout) if timeout is not None else None)


@dataclass(frozen=True)
class Reservation:
    """D's answer to a remote-prefill request: where P must push, into which blocks.

    An empty one (no block ids) means "no transfer": D holds the whole prompt
    already, or cannot receive KV, and computes the request alone.
    """

    transfer_id: str
    decode_endpoints: list[dict[str, Any]] = field(default_factory=list)  # EndpointInfo.to_dict() by TP rank
    decode_block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # prompt tokens whose KV D expects (all but the last)
    first_block: int = 0  # D had this many blocks from its own prefix cache: P skips them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Reservation:
        """From the wire; ParamsError on anything malformed (a peer wrote it)."""
        if not isinstance(data, dict):
            raise ParamsError(f"a reservation must be a mapping, got {type(data).__name__}")
        return cls(_require(data, "transfer_id", str), _endpoints(data), _block_ids(data, "decode_block_ids"),
                   _count(data, "num_tokens"), _count(data, "first_block"))

    def prefill_params(self) -> dict[str, Any]:
        return PrefillParams(self.transfer_id, list(self.decode_endpoints), list(self.decode_block_ids),
                             self.num_tokens, self.first_block).to_dict()


@dataclass(frozen=True)
class PrefillParams:
    """Params of the request on P: push the prompt's KV into D's reserved blocks."""

    transfer_id: str
    decode_endpoints: list[dict[str, Any]]  # by TP rank: P's rank r sends to D's rank r
    decode_block_ids: list[int]
    num_tokens: int  # prompt tokens whose KV D expects (all but the last)
    first_block: int = 0  # D had this many blocks from its own prefix cache: P skips them

    def to_dict(self) -> dict[str, Any]:
        return {"pd_remote_decode": True, **asdict(self)}

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> PrefillParams | None:
        if not params or not params.get("pd_remote_decode"):
            return None
        return cls(_require(params, "transfer_id", str), _endpoints(params), _block_ids(params, "decode_block_ids"),
                   _require(params, "num_tokens", int), _count(params, "first_block"))

