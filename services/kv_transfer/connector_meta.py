"""What the P/D connector's two sides and two instances tell each other.

Lifecycle of one handoff, as data:

1. The controller sends the request to D first, with
   `kv_transfer_params = DecodeParams(transfer_id).to_dict()` (in
   `SamplingParams.extra_args["kv_transfer_params"]`, where vLLM looks).
2. D's scheduler side reserves blocks and posts a `Reservation` (D's
   transport endpoint, D's block ids, the token count) on a
   `ReservationBoard`.
3. The controller takes the reservation and sends the request to P with
   `reservation.prefill_params()` (a `PrefillParams` dict) and max_tokens=1.
4. Each scheduler side tells its worker side what to do in a step through a
   `PDConnectorMetadata`: blocks to receive into (`LoadSpec`), blocks to send
   (`SendSpec`), transfers to abort.

The board here is a directory of JSON files: it works across the engine-core
processes vLLM spawns and needs no service. The controller will implement the
same two-method protocol as a Ray actor.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata, KVConnectorMetadata

from pdserve.kv_transfer.errors import HandshakeError, TransferTimeout

PARAMS_KEY = "kv_transfer_params"  # the extra_args key vLLM reads into Request.kv_transfer_params


class ParamsError(HandshakeError):
    """kv_transfer_params that name a P/D handoff but are malformed."""


def _require(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ParamsError(f"kv_transfer_params lacks a valid {name!r}: {value!r}")
    return value


@dataclass(frozen=True)
class DecodeParams:
    """Params of the request on D: its prompt's KV will come from a prefill instance."""

    transfer_id: str
    timeout_s: float | None = None  # how long D waits for the KV before recomputing

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pd_remote_prefill": True, "transfer_id": self.transfer_id}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> DecodeParams | None:
        """None unless `params` asks for a remote prefill."""
        if not params or not params.get("pd_remote_prefill"):
            return None
        timeout = params.get("timeout_s")
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise ParamsError(f"kv_transfer_params timeout_s is not a number: {timeout!r}")
        return cls(_require(params, "transfer_id", str), float(timeout) if timeout is not None else None)


@dataclass(frozen=True)
class PrefillParams:
    """Params of the request on P: push the prompt's KV into D's reserved blocks."""

    transfer_id: str
    decode_endpoint: dict[str, Any]  # EndpointInfo.to_dict() of D's transport
    decode_block_ids: list[int]
    num_tokens: int  # prompt tokens whose KV D expects (all but the last)
    first_block: int = 0  # D had this many blocks from its own prefix cache: P skips them

    def to_dict(self) -> dict[str, Any]:
        return {"pd_remote_decode": True, **asdict(self)}

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> PrefillParams | None:
        if not params or not params.get("pd_remote_decode"):
            return None
        block_ids = _require(params, "decode_block_ids", list)
        if not all(isinstance(b, int) and b >= 0 for b in block_ids):
            raise ParamsError("kv_transfer_params decode_block_ids must be non-negative integers")
        first = params.get("first_block", 0)
        if not isinstance(first, int) or first < 0:
            raise ParamsError(f"kv_transfer_params first_block is not a block count: {first!r}")
        return cls(_require(params, "transfer_id", str), _require(params, "decode_endpoint", dict),
                   block_ids, _require(params, "num_tokens", int), first)


@dataclass(frozen=True)
class Reservation:
    """D's answer to a remote-prefill request: where P must push, into which blocks."""

    transfer_id: str
    decode_endpoint: dict[str, Any]
    decode_block_ids: list[int]
    num_tokens: int
    first_block: int = 0

    def prefill_params(self) -> dict[str, Any]:
        return PrefillParams(self.transfer_id, self.decode_endpoint, list(self.decode_block_ids),
                             self.num_tokens, self.first_block).to_dict()


class ReservationBoard(Protocol):
    def post(self, reservation: Reservation) -> None: ...
    def take(self, transfer_id: str, timeout_s: float) -> Reservation: ...
    def poll(self, transfer_id: str) -> Reservation | None:
        """The reservation if it is there (taken once), else None; never blocks."""


class FileBoard:
    """Reservations as `<dir>/<transfer_id>.json`; written atomically (rename), taken once."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, transfer_id: str) -> Path:
        if not transfer_id or "/" in transfer_id or transfer_id.startswith("."):
            raise ParamsError(f"transfer id {transfer_id!r} cannot name a board entry")
        return self.directory / f"{transfer_id}.json"

    def post(self, reservation: Reservation) -> None:
        target = self._path(reservation.transfer_id)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".post-")
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(reservation), fh)
        os.replace(tmp, target)  # a reader sees the whole entry or none

    def take(self, transfer_id: str, timeout_s: float) -> Reservation:
        deadline = time.monotonic() + timeout_s
        while (found := self.poll(transfer_id)) is None:
            if time.monotonic() >= deadline:
                raise TransferTimeout(f"no reservation for transfer {transfer_id} within {timeout_s}s")
            time.sleep(0.01)
        return found

    def poll(self, transfer_id: str) -> Reservation | None:
        path = self._path(transfer_id)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        return Reservation(**data)


def board_from_config(spec: str | None) -> ReservationBoard | None:
    """`"file:///dir"` or a plain directory -> FileBoard; None/"" -> no board."""
    if not spec:
        return None
    return FileBoard(spec.removeprefix("file://"))


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
    peer_endpoint: dict[str, Any]
    local_block_ids: list[int]
    remote_block_ids: list[int]
    timeout_s: float


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


@dataclass
class EndpointHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler at start-up: the transport endpoint D advertises in reservations."""

    endpoint: dict[str, Any]
