"""One request through a prefill instance P and a decode instance D.

Lifecycle (the controller's half of `pdserve.kv_transfer.connector`):
  1. D gets the request first, marked "KV comes from elsewhere": it reserves
     blocks and posts a reservation on the board (its endpoint, its block ids).
  2. The reservation is taken and P gets the request with it and max_tokens=1.
     P's token is the client's first token: TTFT never waits for the handoff.
  3. P pushes the prompt's KV layer by layer into D's blocks; D then decodes.
     D's first token is P's token again (same KV, same seed): it is dropped
     and everything after it streams on.
Failure paths: no reservation in time (D is gone or stuck) -> the request
runs colocated on P; P fails -> D times out waiting, recomputes the prompt
and its own first token is kept. Leaving early (client gone) aborts on both
instances, and the connector ends the transfer on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from typing import Any, AsyncIterator

from pdserve.kv_transfer.connector_meta import PARAMS_KEY, DecodeParams, ReservationBoard
from pdserve.kv_transfer.errors import TransferTimeout
from pdserve.shared.errors import EngineError
from pdserve.shared.protocol import EngineRequest, OutputDelta
from pdserve.shared.streams import END, drain
from pdserve.worker.client import EngineClient

logger = logging.getLogger(__name__)

def _with_params(params: Any, **changes: Any) -> Any:
    clone = params.clone()
    for name, value in changes.items():
        setattr(clone, name, value)
    return clone


def _transfer_args(params: Any, kv_params: dict[str, Any]) -> dict[str, Any]:
    return {**(params.extra_args or {}), PARAMS_KEY: kv_params}


@dataclasses.dataclass
class Handoff:
    prefill: EngineClient
    decode: EngineClient
    board: ReservationBoard
    timeout_s: float
    counters: dict[str, int]  # handoffs, fallbacks_colocated, prefill_failures, first_token_mismatches

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def stream(self, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        params = request.sampling_params
        if (params.n or 1) > 1:
            # vLLM fans n > 1 out into child requests it names itself, and a
            # handoff is per request: such requests run whole on D.
            async with contextlib.aclosing(self.decode.generate(request)) as stream:
                async for delta in stream:
                    yield delta
            return
        if params.seed is None and params.temperature > 0:
            # One seed for both: P's sampled first token is then the one D samples too.
            params = _with_params(params, seed=random.getrandbits(63))
        tid = request.request_id
        on_decode = EngineRequest(f"{tid}-d", request.prompt_token_ids,
                                  _with_params(params, extra_args=_transfer_args(params, DecodeParams(tid).to_dict())),
                                  request.arrival_time)
        queue: asyncio.Queue = asyncio.Queue()
        decode_task = asyncio.create_task(drain(lambda: self.decode.generate(on_decode), queue))
        try:
            try:
                reservation = await asyncio.to_thread(self.board.take, tid, self.timeout_s)
            except TransferTimeout:
                logger.warning("no reservation from %s for %s: running it on %s",
                               self.decode.instance_id, tid, self.prefill.instance_id)
                self._count("fallbacks_colocated")
                decode_task.cancel()
                async with contextlib.aclosing(self.prefill.generate(request)) as stream:
                    async for delta in stream:
                        yield delta
                return
            self._count("handoffs")
            on_prefill = EngineRequest(
                f"{tid}-p", request.prompt_token_ids,
                _with_params(params, max_tokens=1, min_tokens=0,
                             extra_args=_transfer_args(params, reservation.prefill_params())),
                request.arrival_time)
            first = await self._first_token(on_prefill)
            if first is not None:
                yield first
            async for delta in self._decode_deltas(queue, first):
                yield delta
        finally:
            decode_task.cancel()
            with contextlib.suppress(BaseException):
                await decode_task

    async def _first_token(self, request: EngineRequest) -> OutputDelta | None:
        """P's token as an unfinished delta, or None if P failed (D will recompute)."""
        try:
            async with contextlib.aclosing(self.prefill.generate(request)) as stream:
                first = None
                async for delta in stream:
                    if delta.token_ids and first is None:
                        first = delta
            if first is None:
                return None
            return dataclasses.replace(first, finish_reason=None, stop_reason=None, request_finished=False)
        except EngineError as exc:
            logger.warning("prefill on %s failed (%s); decode recomputes", self.prefill.instance_id, exc)
            self._count("prefill_failures")
            return None

    async def _decode_deltas(self, queue: asyncio.Queue, first: OutputDelta | None) -> AsyncIterator[OutputDelta]:
        """D's deltas, less the first token (and its text) that P already delivered."""
        skip_tokens = 1 if first is not None else 0
        skip_text = len(first.text) if first is not None else 0
        first_at = time.monotonic()
        pending_handoff: float | None = None  # measured on D's first delta, reported on the first one yielded
        measured = first is None
        while True:
            _, item = await queue.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            delta: OutputDelta = item
            if not measured:
                pending_handoff = time.monotonic() - first_at  # D's first step: the KV has landed
                measured = True
            if skip_tokens and delta.token_ids:
                if first is not None and delta.token_ids[0] != first.token_ids[0]:
                    self._count("first_token_mismatches")
                delta = dataclasses.replace(delta, token_ids=delta.token_ids[1:],
                                            logprobs=delta.logprobs[1:] if delta.logprobs else delta.logprobs)
                skip_tokens = 0
            if skip_text:
                cut = min(skip_text, len(delta.text))
                delta = dataclasses.replace(delta, text=delta.text[cut:])
                skip_text -= cut
            if delta.token_ids or delta.text or delta.finish_reason or delta.request_finished:
                if pending_handoff is not None:
                    delta = dataclasses.replace(delta, handoff_s=pending_handoff)
                    pending_handoff = None
                yield delta
