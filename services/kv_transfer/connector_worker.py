"""Worker side of the P/D connector: the transport, the sends and receives, the copies.

Lifecycle:

- `register_kv_caches` (start-up): reads the layers' KV tensors and their
  memory order, builds the `KVLayout`, starts this instance's transport; its
  endpoint goes to the scheduler side as handshake metadata.
- `bind` (every step, before the forward): aborts what the scheduler says to
  abort, opens a receiver for each new `LoadSpec` (one staging buffer posted
  per layer) and a sender for each new `SendSpec`.
- `save_kv_layer` (P, inside the forward, after each attention layer): gathers
  the request's blocks of that layer and queues them on the sender; the
  transport's writer thread puts them on the wire while the next layers
  compute.
- `transfer_results` (every step, after the forward): a receive that is DONE
  is copied into its reserved blocks and reported finished; one that failed,
  aborted or timed out is reported finished *and failed*, so vLLM recomputes
  the prompt; a send that ended either way is reported finished once vLLM has
  finished the request, which frees P's blocks. A receive aborted because the
  request was aborted on D is reported finished too, with no copy: vLLM holds
  an aborted waiting request's blocks until then.

Received bytes reach the paged KV only on the engine thread, in
`transfer_results`: a late frame can then never land in blocks the scheduler
has freed and given to another request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.kv_transfer.base import KVReceiver, KVSender, KVTransport, TransferState
from pdserve.kv_transfer.blocks import PagedKV, gather, scatter, wrap_layer
from pdserve.kv_transfer.config import TransportConfig
from pdserve.kv_transfer.connector_meta import EndpointHandshake, LoadSpec, PDConnectorMetadata, SendSpec
from pdserve.kv_transfer.errors import BlockSetError, HandshakeError, TransferError
from pdserve.kv_transfer.factory import make_transport
from pdserve.kv_transfer.first_token import FIRST_TOKENS
from pdserve.kv_transfer.layout import EndpointInfo, KVLayout, dtype_name
from pdserve.kv_transfer.registry import EndpointRegistry

log = logging.getLogger(__name__)

COUNTERS = ("recv_done", "recv_failed", "recv_aborted", "send_done", "send_failed", "bytes_sent", "blocks_sent",
            "bytes_saved", "blocks_saved", "transfer_s", "exposed_s", "migrate_sent", "migrate_bytes",
            "migrate_released")


def detect_order(kv: torch.Tensor, head_dim: int) -> str:
    """Which memory order a layer's KV tensor uses, from its shape."""
    if kv.dim() == 4 and kv.shape[-1] == 2 * head_dim:
        return "cpu"
    if kv.dim() == 5 and kv.shape[0] == 2:
        return "kv_first"
    raise BlockSetError(f"unrecognised KV cache tensor shape {tuple(kv.shape)} (head_dim {head_dim})")


@dataclass
class _Load:
    spec: LoadSpec
    receiver: KVReceiver | None  # None: opening failed
    buffers: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Send:
    spec: SendSpec
    sender: KVSender | None  # None: opening failed
    layers_sent: int = 0
    first_layer_at: float | None = None  # monotonic: the first layer went to the wire
    compute_done_at: float | None = None  # the forward that produced the last layer ended
    done_at: float | None = None  # the receiver acknowledged every layer

    def timing(self) -> tuple[float, float] | None:
        """(transfer time, exposed time): the part after the compute ended is not overlapped."""
        if None in (self.first_layer_at, self.compute_done_at, self.done_at):
            return None
        return self.done_at - self.first_layer_at, max(0.0, self.done_at - self.compute_done_at)


def peer_for_rank(endpoints: list[dict[str, Any]], tp_rank: int) -> dict[str, Any]:
    """D's endpoint for this rank: rank r of P sends its share of the heads to rank r of D."""
    if not 0 <= tp_rank < len(endpoints):
        raise HandshakeError(f"decode offers {len(endpoints)} tensor-parallel endpoint(s); prefill rank "
                             f"{tp_rank} has no peer (prefill and decode TP sizes must match)")
    return endpoints[tp_rank]


class PDWorkerSide:
    def __init__(self, instance_id: str, model: str, block_size: int, head_dim: int, tp_size: int, tp_rank: int,
                 transport_kind: str, config: TransportConfig, transport_options: dict | None = None) -> None:
        self.instance_id, self.model, self.block_size, self.head_dim = instance_id, model, block_size, head_dim
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.transport_kind, self.config = transport_kind, config
        self.transport_options = transport_options or {}  # e.g. the loopback fabric of a test
        self.registry = EndpointRegistry()  # peers arrive in SendSpecs; nothing to look up elsewhere
        self.transport: KVTransport | None = None
        self.layout: KVLayout | None = None
        self._layers: list[PagedKV] = []
        self._index: dict[str, int] = {}
        self._loads: dict[str, _Load] = {}
        self._sends: dict[str, _Send] = {}
        self._step_sends: list[_Send] = []
        self._aborted_loads: set[str] = set()  # stopped receives, to report finished so vLLM frees their blocks
        self._finished_reqs: set[str] = set()  # vLLM may free a sender's blocks only once listed here
        self._released: set[str] = set()  # migrations given up before a send: report them so vLLM frees
        self.counters = dict.fromkeys(COUNTERS, 0)

    # -- start-up -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> EndpointInfo:
        if not kv_caches:
            raise BlockSetError("no KV cache layers to register")
        first = next(iter(kv_caches.values()))
        order = detect_order(first, self.head_dim)
        heads = int(first.shape[1] if order == "cpu" else first.shape[3])
        block_size = int(first.shape[2])
        if block_size != self.block_size:
            # Block ids from the scheduler index blocks of its size; a kernel
            # block size that differs would make every id point elsewhere.
            raise BlockSetError(f"KV tensor blocks hold {block_size} tokens, the scheduler's {self.block_size}")
        self._layers = [wrap_layer(kv, order, block_size, heads, self.head_dim) for kv in kv_caches.values()]
        self._index = {name: i for i, name in enumerate(kv_caches)}
        self.layout = KVLayout(model=self.model, dtype=dtype_name(first.dtype), block_size=block_size,
                               num_layers=len(self._layers), num_kv_heads=heads * self.tp_size,
                               head_dim=self.head_dim, tp_size=self.tp_size, tp_rank=self.tp_rank)
        self.transport = make_transport(self.transport_kind, self.instance_id, self.layout, self.registry, self.config,
                                        **self.transport_options)
        endpoint = self.transport.start()
        log.info("KV connector of %s: %d layers in %s order, %s at %s", self.instance_id, len(self._layers), order,
                 self.transport_kind, endpoint.address)
        return endpoint

    def handshake_metadata(self) -> EndpointHandshake | None:
        return EndpointHandshake(self.transport.endpoint.to_dict()) if self.transport is not None else None

    # -- per step, before the forward -----------------------------------------------------
    def bind(self, meta: PDConnectorMetadata) -> None:
        for rid in meta.abort_loads:
            # vLLM holds an aborted request's blocks until we report its receive
            # finished; stop the receive first so nothing is ever copied into them.
            load = self._loads.pop(rid, None)
            if load is not None:
                if load.receiver is not None:
                    load.receiver.abort("request aborted at decode")
                self._aborted_loads.add(rid)
                self.counters["recv_aborted"] += 1
        for rid in meta.abort_sends:
            send = self._sends.get(rid)
            if send is not None and send.sender is not None:
                send.sender.abort("request aborted at prefill")
        for spec in meta.loads:
            self._loads[spec.req_id] = self._open_load(spec)
        self._step_sends = [self._open_send(spec) for spec in meta.sends]
        for send in self._step_sends:
            self._sends[send.spec.req_id] = send
        for token in meta.tokens:
            self._send_token(token.req_id, token.token_ids)
        for spec in meta.migrations:
            self._migrate(spec)
        self._released.update(meta.releases)
        self.counters["migrate_released"] += len(meta.releases)

    def _migrate(self, spec: SendSpec) -> None:
        """Push a stopped request's stored blocks, every layer now, then an empty token frame.

        The request is finished in vLLM already (stopped for migration), so it is listed as
        finished here: its blocks are freed as soon as the send ends, either way.
        """
        send = self._open_send(spec)
        self._sends[spec.req_id] = send
        self._finished_reqs.add(spec.req_id)
        if send.sender is None:
            return
        try:
            for layer, paged in enumerate(self._layers):
                blocks = gather(paged, spec.local_block_ids)
                send.sender.send(layer, blocks)
                self.counters["migrate_bytes"] += blocks.numel() * blocks.element_size()
            # The target samples on its own from the last token: an empty token frame completes its receive.
            send.sender.send_token([])
        except TransferError as exc:  # the target ended it (abort, timeout): the send reports failed
            log.info("request %s: migration send stopped: %s", spec.req_id, exc)
            return
        self.counters["migrate_sent"] += 1  # (no timing: nothing overlaps, the P->D overlap figures stay P->D's)

    def _send_token(self, req_id: str, token_ids: list[int]) -> None:
        """P sampled its token from the KV on the wire: D continues from it (see first_token)."""
        send = self._sends.get(req_id)
        if send is None or send.sender is None:
            return
        try:
            send.sender.send_token(token_ids)
        except TransferError as exc:  # ended already (D aborted, timeout): D recomputes or is gone
            log.info("request %s: first token not sent: %s", req_id, exc)

    def _open_load(self, spec: LoadSpec) -> _Load:
        assert self.transport is not None and self.layout is not None
        try:
            receiver = self.transport.open_receiver(spec.transfer_id, spec.block_ids, spec.timeout_s,
                                                    expect_token=True)
        except TransferError as exc:
            log.warning("request %s: cannot receive transfer %s: %s", spec.req_id, spec.transfer_id, exc)
            return _Load(spec, None)
        shape = self.layout.block_set_shape(len(spec.block_ids))
        load = _Load(spec, receiver, [torch.empty(shape, dtype=self.layout.torch_dtype)
                                      for _ in range(self.layout.num_layers)])
        try:
            for layer, buffer in enumerate(load.buffers):
                receiver.recv_into(layer, buffer)
        except TransferError as exc:  # ended already (peer abort, timeout): reported as failed later
            log.warning("request %s: transfer %s ended while posting buffers: %s", spec.req_id, spec.transfer_id, exc)
        return load

    def _open_send(self, spec: SendSpec) -> _Send:
        assert self.transport is not None
        try:
            peer = EndpointInfo.from_dict(peer_for_rank(spec.peer_endpoints, self.tp_rank))
            self.registry.register(peer)  # the reservation told us where D listens
            sender = self.transport.open_sender(peer.instance_id, spec.transfer_id, spec.remote_block_ids,
                                                spec.timeout_s)
        except TransferError as exc:
            log.warning("request %s: cannot send transfer %s: %s", spec.req_id, spec.transfer_id, exc)
            return _Send(spec, None)
        send = _Send(spec, sender)
        # Runs on the transport's thread when the receiver has acknowledged everything (or it ended).
        sender.add_done_callback(lambda state: setattr(send, "done_at", time.monotonic()))
        return send

    # -- inside the forward (P) ---------------------------------------------------------
    def save_layer(self, layer_name: str) -> None:
        """Queue this layer's blocks of every request whose prompt completes in this step."""
        if not self._step_sends:
            return
        layer = self._index.get(layer_name)
        if layer is None:
            return  # not a layer we registered (e.g. a draft model's)
        for send in self._step_sends:
            if send.sender is None:
                continue
            blocks = gather(self._layers[layer], send.spec.local_block_ids)
            try:
                send.sender.send(layer, blocks)
            except TransferError as exc:  # D ended it (abort, timeout): the rest is moot
                log.info("request %s: layer %d not sent: %s", send.spec.req_id, layer, exc)
                continue
            if send.first_layer_at is None:
                send.first_layer_at = time.monotonic()
            send.layers_sent += 1
            sent = blocks.numel() * blocks.element_size()
            self.counters["bytes_sent"] += sent
            if send.spec.skipped_blocks:
                # What D's prefix cache spared this layer: its blocks are the size of the ones sent.
                self.counters["bytes_saved"] += sent // len(send.spec.local_block_ids) * send.spec.skipped_blocks
            if layer == 0:
                self.counters["blocks_sent"] += len(send.spec.local_block_ids)
                self.counters["blocks_saved"] += send.spec.skipped_blocks

    # -- per step, after the forward ------------------------------------------------------
    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) request ids."""
        now = time.monotonic()
        for send in self._step_sends:  # the forward that produced their layers is over
            send.compute_done_at = now
        self._step_sends = []
        self._finished_reqs |= finished_req_ids
        recving, failed = self._collect_loads()
        recving |= self._aborted_loads
        self._aborted_loads = set()
        sending = self._collect_sends() | self._released
        self._released = set()
        return sending, recving, failed

    def _collect_loads(self) -> tuple[set[str], set[str]]:
        recving: set[str] = set()
        failed: set[str] = set()
        for rid, load in list(self._loads.items()):
            state = load.receiver.poll() if load.receiver is not None else TransferState.FAILED
            if not state.terminal:
                continue
            del self._loads[rid]
            recving.add(rid)
            if state is TransferState.DONE and self._land(load):
                self.counters["recv_done"] += 1
                tokens = load.receiver.token_ids if load.receiver is not None else None
                if tokens:
                    FIRST_TOKENS.put(load.spec.transfer_id, tokens[0])
                continue
            failed.add(rid)  # vLLM recomputes the prompt on D
            self.counters["recv_failed"] += 1
            error = load.receiver.error if load.receiver is not None else None
            log.warning("request %s: KV transfer %s %s (%s); decode recomputes the prompt", rid,
                        load.spec.transfer_id, state.value, error)
        return recving, failed

    def _land(self, load: _Load) -> bool:
        try:
            for paged, buffer in zip(self._layers, load.buffers):
                scatter(paged, load.spec.block_ids, buffer)
        except BlockSetError as exc:
            log.error("request %s: received KV does not fit: %s", load.spec.req_id, exc)
            return False
        return True

    def _collect_sends(self) -> set[str]:
        done: set[str] = set()
        for rid, send in list(self._sends.items()):
            state = send.sender.poll() if send.sender is not None else TransferState.FAILED
            if not state.terminal or rid not in self._finished_reqs:
                continue
            del self._sends[rid]
            self._finished_reqs.discard(rid)
            done.add(rid)
            self.counters["send_done" if state is TransferState.DONE else "send_failed"] += 1
            timing = send.timing() if state is TransferState.DONE else None
            if timing is not None:
                self.counters["transfer_s"] += timing[0]
                self.counters["exposed_s"] += timing[1]
        # Finished requests that never had a send here need no memory.
        self._finished_reqs &= set(self._sends)
        return done

    def take_counters(self) -> dict[str, int]:
        """Counts since the last call (vLLM's stats are per interval)."""
        out = {k: v for k, v in self.counters.items() if v}
        self.counters = dict.fromkeys(COUNTERS, 0)
        return out

    def shutdown(self) -> None:
        for load in self._loads.values():
            if load.receiver is not None:
                load.receiver.abort("decode instance shutting down")
        for send in self._sends.values():
            if send.sender is not None:
                send.sender.abort("prefill instance shutting down")
        self._loads.clear()
        self._sends.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
