"""Migration out of a decode instance: stop a running request, hold its blocks, push them, free them.

Stop-and-copy, on the source decode instance S (the scheduler side of the
connector; the engine-core utilities in `worker.vllm_plugin` drive it):

1. `stop(request)` (utility `pdserve_migrate_stop`, between two engine steps):
   the request is marked HELD and vLLM finishes it as aborted; the
   connector's `request_finished` answers "keep the blocks" for a held
   request, so its KV stays where it is. The utility answers the request's
   token ids (prompt, outputs) and how many of them have KV (all but the last
   sampled token, which nobody has computed yet).
2. The router admits the request on the target T with prompt + outputs as
   its prompt, marked "KV comes from elsewhere" (T reserves blocks for all
   tokens but the last and posts a reservation, as a decode instance does for
   a prefill instance); T computes the last token itself, as after P.
3. `send(request_id, reservation)` (utility `pdserve_migrate_send`): a
   `SendSpec` in the next step's metadata; the worker side gathers every
   layer's blocks at once (no forward needed, the KV exists) and queues them
   on the transport, then an empty token frame (T samples on its own).
   HELD -> SENDING. The worker reports the send finished (done or failed)
   and vLLM frees the blocks.
4. `release(request_id)` (utility `pdserve_migrate_release`, or the hold's
   deadline): HELD -> released; the worker reports it finished without a
   send, and vLLM frees the blocks. Used when the target never reserved (it
   refused, died, timed out): the router then resumes the request on S by
   resubmitting prompt + outputs (S's prefix cache holds the full blocks).

A held request no one sends or releases is released at its deadline, so no
block outlives a lost router. Nothing here blocks the engine thread.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.kv_transfer.errors import TransferError
from pdserve.kv_transfer.params import Reservation

if TYPE_CHECKING:  # the router imports this module (StoppedRequest, MigrationError): no vLLM, no torch
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.request import Request

    from pdserve.kv_transfer.connector_meta import PDConnectorMetadata

log = logging.getLogger(__name__)


class MigrationError(TransferError):
    """A migration step the source cannot do (unknown request, wrong state, token counts that differ)."""


class HoldState(enum.Enum):
    HELD = "held"  # stopped, blocks kept, waiting for the target's reservation
    SENDING = "sending"  # blocks on the wire; freed when the worker reports the send ended
    RELEASED = "released"  # freed without a send (the worker reports it finished)


@dataclass
class _Hold:
    request: Request
    deadline: float  # monotonic: released if nothing was sent by then
    state: HoldState = HoldState.HELD


@dataclass(frozen=True)
class StoppedRequest:
    """What the router needs to admit a stopped request elsewhere (plain data: crosses processes)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int  # tokens whose KV the source holds: prompt + outputs but the last

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "prompt_token_ids": self.prompt_token_ids,
                "output_token_ids": self.output_token_ids, "num_computed_tokens": self.num_computed_tokens}


class MigrationSource:
    """The source's half of a migration, kept by the connector's scheduler side."""

    def __init__(self, block_size: int, hold_timeout_s: float) -> None:
        self.block_size = block_size
        self.hold_timeout_s = hold_timeout_s
        self._holds: dict[str, _Hold] = {}
        self.counters = {"stopped": 0, "sent": 0, "released": 0, "hold_expired": 0}

    # -- the utilities' side ----------------------------------------------------------------
    def stop(self, request: Request) -> StoppedRequest:
        """Mark a running request held; the caller then finishes it in the scheduler."""
        rid = request.request_id
        if rid in self._holds:
            raise MigrationError(f"request {rid} is already being migrated")
        if request.status.name != "RUNNING":
            raise MigrationError(f"request {rid} is {request.status.name}, not running")
        outputs = [int(t) for t in request.output_token_ids]
        prompt = [int(t) for t in request.prompt_token_ids or ()]
        computed = int(request.num_computed_tokens)
        if not outputs or computed != len(prompt) + len(outputs) - 1:
            # Mid-prefill, or between a preemption and its recompute: nothing coherent to move.
            raise MigrationError(f"request {rid}: {computed} tokens computed of {len(prompt)} + {len(outputs)}")
        self._holds[rid] = _Hold(request, time.monotonic() + self.hold_timeout_s)
        self.counters["stopped"] += 1
        return StoppedRequest(rid, prompt, outputs, computed)

    def send(self, rid: str, reservation: Reservation, block_ids: list[int], meta: PDConnectorMetadata,
             timeout_s: float) -> None:
        """Queue the push of a held request's blocks `block_ids` (its whole table) into `reservation`."""
        hold = self._holds.get(rid)
        if hold is None or hold.state is not HoldState.HELD:
            raise MigrationError(f"request {rid} is not held here ({hold.state.value if hold else 'unknown'})")
        if reservation.num_tokens != hold.request.num_computed_tokens:
            raise MigrationError(f"request {rid}: the target expects {reservation.num_tokens} tokens, "
                                 f"this instance holds {hold.request.num_computed_tokens}")
        from pdserve.kv_transfer.connector_meta import SendSpec

        last = -(-reservation.num_tokens // self.block_size)  # blocks holding those tokens
        local = [int(b) for b in block_ids[reservation.first_block:last]]
        if len(local) != len(reservation.decode_block_ids):
            raise MigrationError(f"request {rid}: {len(local)} local blocks for "
                                 f"{len(reservation.decode_block_ids)} reserved at the target")
        meta.migrations.append(SendSpec(rid, reservation.transfer_id, list(reservation.decode_endpoints), local,
                                        list(reservation.decode_block_ids), timeout_s,
                                        skipped_blocks=reservation.first_block))
        hold.state = HoldState.SENDING
        self.counters["sent"] += 1

    def release(self, rid: str, meta: PDConnectorMetadata) -> bool:
        """Free a held request's blocks without sending; False if it is not held (sent or unknown)."""
        hold = self._holds.get(rid)
        if hold is None or hold.state is not HoldState.HELD:
            return False
        hold.state = HoldState.RELEASED
        meta.releases.append(rid)
        self.counters["released"] += 1
        return True

    # -- the connector's side ---------------------------------------------------------------
    def holds(self, rid: str) -> bool:
        """request_finished asks: keep this request's blocks?"""
        return rid in self._holds

    def expire(self, meta: PDConnectorMetadata) -> None:
        """Release holds past their deadline (the router never sent the reservation)."""
        now = time.monotonic()
        for rid, hold in self._holds.items():
            if hold.state is HoldState.HELD and now >= hold.deadline:
                log.warning("request %s: held for migration %.0f s with no target; freeing its blocks", rid,
                            self.hold_timeout_s)
                self.counters["hold_expired"] += 1
                self.release(rid, meta)

    def finished(self, rid: str) -> None:
        """The worker reported the blocks free to go (sent, failed or released)."""
        self._holds.pop(rid, None)

    def pending(self) -> bool:
        return bool(self._holds)

    def block_ids(self, kv_cache_manager: KVCacheManager | None, rid: str) -> list[int]:
        if kv_cache_manager is None:
            raise MigrationError("no KV cache manager bound")
        return [int(b) for b in kv_cache_manager.get_block_ids(rid)[0]]
