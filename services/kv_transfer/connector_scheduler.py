"""Scheduler side of the P/D connector: which blocks move, and when blocks may be freed.

Lifecycle of a request, per instance:

D (params `DecodeParams`):
  get_num_new_matched_tokens -> all prompt tokens but the last (and any local
  prefix hit) are "external, loaded asynchronously"; vLLM parks the request in
  WAITING_FOR_REMOTE_KVS -> update_state_after_alloc: the reserved blocks
  become a `LoadSpec` and a `Reservation` posted to the router's inbox
  (`DecodeParams.reply_to`, see `reservations`) -> the worker
  side reports the receive finished (or failed: vLLM then recomputes) ->
  decode runs -> request_finished: nothing held, vLLM frees the blocks.
  Aborted while waiting: the receive is aborted (both sides end) and
  reported finished without a copy, upon which vLLM frees the blocks (it
  holds an aborted waiting request's blocks until the connector says so).
  Received data reaches blocks only on the engine thread, after the abort
  check, so an aborted request's blocks are never written.

P (params `PrefillParams`):
  scheduled chunks are counted; in the step that computes the prompt's last
  chunk a `SendSpec` goes to the worker side, which pushes each layer as it is
  computed -> request_finished returns True (P's blocks stay until the worker
  reports the send finished, on success or failure) -> vLLM frees them.
  Aborted before that step: nothing was sent, the blocks are freed at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.kv_transfer.blocks import blocks_for_tokens
from pdserve.kv_transfer.connector_meta import LoadSpec, PDConnectorMetadata, SendSpec, TokenSpec
from pdserve.kv_transfer.migration import MigrationSource
from pdserve.kv_transfer.params import DecodeParams, ParamsError, PrefillParams, Reservation
from pdserve.kv_transfer.reservations import ReservationPoster

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class _Receive:
    params: DecodeParams
    local_tokens: int  # prompt tokens D already had (prefix cache); their blocks are not transferred
    external_tokens: int = 0


@dataclass
class _Send:
    params: PrefillParams
    request: Request  # the scheduler's live object: its num_computed_tokens survives preemption correctly
    emitted: bool = False


class PDSchedulerSide:
    def __init__(self, block_size: int, poster: ReservationPoster | None, transfer_timeout_s: float) -> None:
        self.block_size = block_size
        self.poster = poster  # None: this instance cannot receive KV (it computes every prompt itself)
        self.transfer_timeout_s = transfer_timeout_s
        # D's transports by TP rank, from the workers' handshake metadata; None until all ranks told.
        self.endpoints: list[dict[str, Any]] | None = None
        self.kv_cache_manager: KVCacheManager | None = None
        self._receives: dict[str, _Receive] = {}
        self._answered: set[str] = set()  # had blocks for a load once: a re-ask after a failed load means "recompute"
        self._sends: dict[str, _Send] = {}
        self._sending: set[str] = set()  # P requests whose blocks wait for the worker's finished_sending
        self._meta = PDConnectorMetadata()
        # Requests stopped for migration to another decode instance (their blocks held until sent).
        self.migration = MigrationSource(block_size, transfer_timeout_s)

    # -- admission ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        rid = request.request_id
        try:
            recv = DecodeParams.parse(request.kv_transfer_params)
            send = PrefillParams.parse(request.kv_transfer_params)
        except ParamsError as exc:
            log.warning("request %s: ignoring its kv_transfer_params: %s", rid, exc)
            return 0, False
        if send is not None and send.decode_block_ids and rid not in self._sends:
            self._sends[rid] = _Send(send, request)  # (an empty reservation: nothing to push)
        if recv is None or rid in self._answered:
            return 0, False
        # vLLM's connectors leave the last prompt token to D: computing it is
        # what produces the logits of the next token.
        external = len(request.prompt_token_ids or ()) - 1 - num_computed_tokens
        if rid in self._receives:
            # Asked again before any allocation (D had no KV room on the last
            # step): still a remote prefill; the reservation is posted when
            # vLLM finally allocates (update_state_after_alloc).
            self._receives[rid].local_tokens = num_computed_tokens
            return max(external, 0), external > 0
        if external <= 0 or self.endpoints is None or self.poster is None or recv.reply_to is None:
            if external > 0:
                log.warning("request %s: no KV endpoint or no router to reply to; D computes the prompt", rid)
            self._answered.add(rid)
            if self.poster is not None and recv.reply_to is not None:
                # An empty reservation: the router must not wait for blocks that never come.
                self.poster.post(recv.reply_to, Reservation(recv.transfer_id))
            return 0, False
        self._receives[rid] = _Receive(recv, num_computed_tokens)
        return external, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        receive = self._receives.get(rid)
        if receive is None or num_external_tokens <= 0 or receive.external_tokens:
            return  # not ours, or the second call (blocks for the tokens after the load)
        receive.external_tokens = num_external_tokens
        self._answered.add(rid)
        table = blocks.get_block_ids()[0]
        first = receive.local_tokens // self.block_size  # local hits are whole blocks
        last = blocks_for_tokens(receive.local_tokens + num_external_tokens, self.block_size)
        reserved = [int(b) for b in table[first:last]]
        timeout = receive.params.timeout_s or self.transfer_timeout_s
        self._meta.loads.append(LoadSpec(rid, receive.params.transfer_id, reserved, timeout))
        # All three were checked on admission.
        assert self.poster is not None and self.endpoints is not None and receive.params.reply_to is not None
        self.poster.post(receive.params.reply_to, Reservation(
            receive.params.transfer_id, list(self.endpoints), reserved, receive.local_tokens + num_external_tokens,
            first))

    # -- per step -----------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PDConnectorMetadata:
        self.migration.expire(self._meta)
        for rid, num in scheduler_output.num_scheduled_tokens.items():
            send = self._sends.get(rid)
            # vLLM builds the metadata before it advances num_computed_tokens:
            # computed + scheduled is where the prompt stands after this step.
            if send is not None and not send.emitted and \
                    send.request.num_computed_tokens + num >= send.params.num_tokens:
                self._emit_send(rid, send)
        meta, self._meta = self._meta, PDConnectorMetadata()
        return meta

    def _emit_send(self, rid: str, send: _Send) -> None:
        """This step computes the prompt's last chunk: tell the worker to push every layer as it lands."""
        if self.kv_cache_manager is None:
            log.error("request %s: no KV cache manager bound; cannot send its KV", rid)
            send.emitted = True
            return
        p = send.params
        table = self.kv_cache_manager.get_block_ids(rid)[0]
        last = blocks_for_tokens(p.num_tokens, self.block_size)
        local = [int(b) for b in table[p.first_block:last]]
        send.emitted = True
        if len(local) != len(p.decode_block_ids):
            log.error("request %s: %d local blocks for %d reserved at D; not sending", rid, len(local),
                      len(p.decode_block_ids))
            return
        self._meta.sends.append(SendSpec(rid, p.transfer_id, list(p.decode_endpoints), local, p.decode_block_ids,
                                         self.transfer_timeout_s, skipped_blocks=p.first_block))
        self._sending.add(rid)

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        for rid in output.finished_sending or ():
            self._sending.discard(rid)
            self._sends.pop(rid, None)
            self.migration.finished(rid)

    # -- the end of a request -----------------------------------------------------------
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """True keeps the blocks until the worker reports the send finished."""
        rid = request.request_id
        self._answered.discard(rid)
        if self.migration.holds(rid):
            self._receives.pop(rid, None)  # its load (if any) finished long ago
            return True, None  # stopped for migration: its blocks go to the target first (or are released)
        receive = self._receives.pop(rid, None)
        if receive is not None and request.status.name == "FINISHED_ABORTED" and receive.external_tokens:
            self._meta.abort_loads.append(rid)  # harmless if the load already finished
        if rid in self._sending:
            tokens = [int(t) for t in request.output_token_ids]
            if request.status.name == "FINISHED_ABORTED" or not tokens:
                self._meta.abort_sends.append(rid)
            else:
                # D continues from the token sampled here: it follows the KV.
                self._meta.tokens.append(TokenSpec(rid, tokens))
            return True, None
        self._sends.pop(rid, None)
        return False, None

    # -- migration out (called by the engine-core utilities, between steps) ---------------
    def migrate_send(self, rid: str, reservation: Reservation) -> None:
        """Push a stopped request's blocks into the target's reservation (MigrationError if it cannot)."""
        blocks = self.migration.block_ids(self.kv_cache_manager, rid)
        self.migration.send(rid, reservation, blocks, self._meta, self.transfer_timeout_s)

    def migrate_release(self, rid: str) -> bool:
        """Free a stopped request's blocks without a send; False if it was not held."""
        return self.migration.release(rid, self._meta)

    def has_pending_push_work(self) -> bool:
        """Keep the engine stepping while sends hold blocks: completion is noticed only in a step."""
        return bool(self._sending or self._meta.abort_loads or self._meta.abort_sends or self._meta.tokens
                    or self.migration.pending())
