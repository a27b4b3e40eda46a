"""One request through a prefill instance P and a decode instance D.

Lifecycle (the controller's half of `pdserve.kv_transfer.connector`):
  1. D gets the request first, marked "KV comes from elsewhere": it reserves
     blocks when it has room (a request waiting for room is waited for, not
     recomputed) and posts a reservation (its endpoints, its block ids) to
     the router's inbox, whose address the request carries.
  2. P gets the request with the reservation and max_tokens=1. P's token is
     the client's first token (TTFT never waits for the handoff); P pushes the
     prompt's KV layer by layer into D's blocks, then the token itself.
  3. D continues from P's token: its first sampling step can only yield that
     token (`kv_transfer.first_token`), so D's output is P's token, which is
     dropped here, then the rest. No seed is added to the user's request.
Failure paths, each ending the other half at once:
  - D fails or ends before P got the request: the request runs whole on P.
  - P fails before its token: D is aborted (its blocks freed) and the
    request runs whole on D.
  - D's KV never landed but P's token was sent: D recomputes (its connector
    says so); if it then samples another first token, it is restarted with
    P's token forced (`FIRST_TOKEN_KEY`), so the stream goes on from it.
  - D takes longer than the transfer timeout after P's token (a stuck
    transfer, a frozen D): D is aborted and the request goes on whole on P
    from its own token (P holds the prompt in its prefix cache).
  - D fails after the client saw tokens: the handoff raises the engine's error,
    and the resumable stream around it (`pdserve.router.resume`, as the router
    wraps every route) continues the request on another instance by recomputing
    prompt + generated tokens; only when none can take it does the client get
    an error event. The client leaving aborts both.
`where()` says which instance (and request id there) produces the tokens now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncIterator

from pdserve.kv_transfer.errors import TransferTimeout
from pdserve.kv_transfer.params import PARAMS_KEY, DecodeParams, Reservation
from pdserve.kv_transfer.reservations import ReservationSource
from pdserve.shared.errors import EngineError, InvalidRequestError
from pdserve.shared.protocol import FIRST_TOKEN_KEY, EngineRequest, OutputDelta
from pdserve.shared.streams import END, drain
from pdserve.worker.client import EngineClient

logger = logging.getLogger(__name__)

# The inbox wakes a waiting handoff when its reservation lands; between wake-ups the handoff checks
# whether D ended, first often, then every _POLL_MAX_S.
_POLL_FIRST_S, _POLL_MAX_S = 0.002, 0.05


def _with_params(params: Any, **changes: Any) -> Any:
    clone = params.clone()
    for name, value in changes.items():
        setattr(clone, name, value)
    return clone


def _extra(params: Any, **entries: Any) -> dict[str, Any]:
    return {**(params.extra_args or {}), **entries}


class _Fallback(Exception):
    """One half failed before the client saw anything: run the request whole on `target`."""

    def __init__(self, target: EngineClient, reason: str) -> None:
        super().__init__(reason)
        self.target = target


@dataclasses.dataclass
class Handoff:
    prefill: EngineClient
    decode: EngineClient
    inbox: ReservationSource
    timeout_s: float  # longest wait for D's reservation (D may be queued for KV room)
    transfer_timeout_s: float  # after P's token, longest wait for D's first step (the KV's progress deadline)
    counters: dict[str, int]  # handoffs, fallbacks_*, prefill_failures, first_token_restarts, ...
    # (instance, its request id) producing the tokens now: D's half until a fallback moves them to P
    serving: tuple[str, str] = ("", "")

    def __post_init__(self) -> None:
        self.serving = (self.decode.instance_id, "")

    def where(self) -> tuple[str, str]:
        """Where the request's tokens come from now (a resumable stream's `where`)."""
        return self.serving

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def stream(self, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        params = request.sampling_params
        if (params.n or 1) > 1 or params.max_tokens == 1:
            # vLLM fans n > 1 out into child requests it names itself, and a
            # handoff is per request: those run whole on D; one token is P's job.
            whole = self.decode if (params.n or 1) > 1 else self.prefill
            async for delta in self._whole(whole, request):
                yield delta
            return
        run = _Run(self, request)
        try:
            async for delta in run.deltas():
                yield delta
        except _Fallback as fallback:
            logger.warning("request %s runs whole on %s: %s", request.request_id, fallback.target.instance_id,
                           fallback)
            async for delta in self._whole(fallback.target, request):
                yield delta
        finally:
            await run.close()

    async def _whole(self, client: EngineClient, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        self.serving = (client.instance_id, request.request_id)
        async with contextlib.aclosing(client.generate(request)) as stream:
            async for delta in stream:
                yield delta


class _Run:
    """The state of one handoff: both halves' streams merged into one queue."""

    def __init__(self, handoff: Handoff, request: EngineRequest) -> None:
        self.h, self.request = handoff, request
        self.tid = request.request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: dict[str, asyncio.Task] = {}
        self.decode_tag = "d0"
        self.attempts = 1  # decode attempts so far (a restart from P's token is a second)
        self.first: OutputDelta | None = None  # P's token, as the client got it
        self.skip_text = 0  # characters of D's text the client already has
        self.first_at = 0.0
        self.handoff_s: float | None = None  # P's token -> D's first step, reported on the next delta out

    def _start(self, tag: str, client: EngineClient, request: EngineRequest) -> None:
        if tag != "p":
            self.h.serving = (client.instance_id, request.request_id)
        self.tasks[tag] = asyncio.create_task(drain(lambda: client.generate(request), self.queue, tag))

    async def _stop(self, tag: str) -> None:
        task = self.tasks.pop(tag, None)
        if task is not None:
            task.cancel()  # closing the stream aborts the engine request (its blocks are freed)
            with contextlib.suppress(BaseException):
                await task

    async def close(self) -> None:
        for tag in list(self.tasks):
            await self._stop(tag)

    async def deltas(self) -> AsyncIterator[OutputDelta]:
        params = self.request.sampling_params
        kv = DecodeParams(self.tid, reply_to=self.h.inbox.address, timeout_s=self.h.timeout_s).to_dict()
        self._start(self.decode_tag, self.h.decode, dataclasses.replace(
            self.request, request_id=f"{self.tid}-d",
            sampling_params=_with_params(params, prompt_logprobs=None, extra_args=_extra(params, **{PARAMS_KEY: kv}))))
        reservation = await self._reservation()
        if not reservation.decode_block_ids:
            # D holds the whole prompt already (prefix cache) or cannot take KV: D runs it alone.
            self.h._count("decode_alone")
            async for delta in self._decode_only():
                yield delta
            return
        self.h._count("handoffs")
        self._start("p", self.h.prefill, EngineRequest(
            f"{self.tid}-p", self.request.prompt_token_ids,
            _with_params(params, max_tokens=1, min_tokens=min(params.min_tokens, 1),
                         extra_args=_extra(params, **{PARAMS_KEY: reservation.prefill_params()})),
            self.request.arrival_time))
        async for delta in self._merge():
            yield delta

    async def _reservation(self) -> Reservation:
        """D's reservation; raises _Fallback (to P) if D fails or stays silent past the wait."""
        deadline, pause = time.monotonic() + self.h.timeout_s, _POLL_FIRST_S
        decode = self.tasks[self.decode_tag]
        while True:
            ended = decode.done()  # read before polling: a reservation posted just before the end counts
            found = self.h.inbox.poll(self.tid)
            if not self.queue.empty() and not ended:
                return Reservation(self.tid)  # D is running it without a transfer: let it
            if ended and (found is None or self._failed(self.queue)):
                _, item = self.queue.get_nowait()
                if isinstance(item, InvalidRequestError):
                    raise item
                await self._stop(self.decode_tag)
                self.h._count("fallbacks_colocated")
                raise _Fallback(self.h.prefill, f"decode {self.h.decode.instance_id} ended before P started: "
                                                f"{item if item is not END else 'no output'}")
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                await self._stop(self.decode_tag)
                self.h._count("fallbacks_colocated")
                raise _Fallback(self.h.prefill, str(TransferTimeout(f"no reservation within {self.h.timeout_s}s")))
            await self.h.inbox.wait(self.tid, pause)
            pause = min(pause * 2, _POLL_MAX_S)

    @staticmethod
    def _failed(queue: asyncio.Queue) -> bool:
        """The first thing a finished stream left is its error (or its end with no output)."""
        if queue.empty():
            return True
        _, item = queue._queue[0]  # type: ignore[attr-defined] - a peek; asyncio.Queue has none
        return item is END or isinstance(item, BaseException)

    async def _decode_only(self) -> AsyncIterator[OutputDelta]:
        while True:
            _, item = await self.queue.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.request_finished:
                return

    async def _next(self) -> tuple[str, Any]:
        """The next item of either half; past P's token, D's first step has a deadline."""
        if self.first is None or not self.first.token_ids or self.decode_tag != "d0":
            return await self.queue.get()
        left = self.first_at + self.h.transfer_timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(self.queue.get(), max(left, 0.0))
        except asyncio.TimeoutError:
            self.h._count("handoff_timeouts")
            logger.warning("request %s: no decode step %.0f s after prefill's token; continuing on %s",
                           self.tid, self.h.transfer_timeout_s, self.h.prefill.instance_id)
            self._continue_from_first(self.h.prefill)
            return await self._next()

    async def _merge(self) -> AsyncIterator[OutputDelta]:
        while True:
            tag, item = await self._next()
            if tag == "p":
                out = await self._on_prefill(item)
            elif tag == self.decode_tag:
                out = await self._on_decode(item)
            else:
                continue  # a stopped decode attempt's leftovers
            if out is not None:
                yield out
                if out.request_finished:
                    return

    async def _on_prefill(self, item: Any) -> OutputDelta | None:
        if isinstance(item, InvalidRequestError):
            raise item  # the engine refused the input: another instance would too
        if item is END or isinstance(item, BaseException):
            self.tasks.pop("p", None)
            if self.first is None:
                # P never produced the token: D's reservation is moot, D computes it all.
                self.h._count("prefill_failures")
                await self._stop(self.decode_tag)
                raise _Fallback(self.h.decode, f"prefill {self.h.prefill.instance_id} failed: "
                                               f"{item if item is not END else 'no token'}")
            return None  # P is done; if its KV did not all land, D recomputes
        delta: OutputDelta = item
        if not delta.token_ids or self.first is not None:
            return None
        if delta.finish_reason == "stop":
            # EOS, a stop token or a stop string in the first token: the request is over.
            await self._stop(self.decode_tag)
            return dataclasses.replace(delta, request_finished=True)
        hold = getattr(self.request.sampling_params, "output_text_buffer_length", 0) or 0
        text = delta.text[:max(len(delta.text) - hold, 0)]  # what a colocated engine would release now
        self.first, self.skip_text, self.first_at = delta, len(text), time.monotonic()
        return dataclasses.replace(delta, text=text, finish_reason=None, stop_reason=None, request_finished=False)

    async def _on_decode(self, item: Any) -> OutputDelta | None:
        if isinstance(item, InvalidRequestError):
            raise item
        if item is END or isinstance(item, BaseException):
            self.tasks.pop(self.decode_tag, None)
            if self.first is None:
                await self._stop("p")
                self.h._count("fallbacks_colocated")
                raise _Fallback(self.h.prefill, f"decode {self.h.decode.instance_id} failed: {item}")
            if isinstance(item, BaseException):
                raise item
            raise EngineError(f"decode instance {self.h.decode.instance_id} ended the stream early")
        delta: OutputDelta = item
        if self.first is None:
            # D's transfer failed and it recomputed before P's token came: the client has seen
            # nothing, so D's own tokens are the stream.
            await self._stop("p")
            self.first = dataclasses.replace(delta, token_ids=[])
            return delta
        if self.first.token_ids and delta.token_ids:
            return await self._drop_first_token(delta)
        return self._after_first(delta)

    async def _drop_first_token(self, delta: OutputDelta) -> OutputDelta | None:
        """D's first token repeats P's; anything else means D sampled on its own (its KV failed)."""
        expected = self.first.token_ids[0]
        if delta.token_ids[0] != expected:
            self.h._count("first_token_restarts")
            logger.warning("request %s: decode's first token %d is not prefill's %d (its KV failed); "
                           "restarting decode from prefill's token", self.tid, delta.token_ids[0], expected)
            await self._stop(self.decode_tag)
            self._continue_from_first(self.h.decode)
            return None
        self.first = dataclasses.replace(self.first, token_ids=[])  # dropped once
        self.handoff_s = time.monotonic() - self.first_at
        rest = dataclasses.replace(delta, token_ids=delta.token_ids[1:],
                                   logprobs=delta.logprobs[1:] if delta.logprobs else delta.logprobs)
        return self._after_first(rest)

    def _continue_from_first(self, client: EngineClient) -> None:
        """A new decoding half on `client`, its first token forced to P's (it recomputes the prompt)."""
        old = self.tasks.pop(self.decode_tag, None)
        if old is not None:
            old.cancel()  # its stream's close aborts it on its instance
        self.decode_tag = f"d{self.attempts}"
        self.attempts += 1
        params = self.request.sampling_params
        self._start(self.decode_tag, client, dataclasses.replace(
            self.request, request_id=f"{self.tid}-{self.decode_tag}",
            sampling_params=_with_params(params, prompt_logprobs=None,
                                         extra_args=_extra(params, **{FIRST_TOKEN_KEY: self.first.token_ids[0]}))))

    def _after_first(self, delta: OutputDelta) -> OutputDelta | None:
        if self.skip_text:
            cut = min(self.skip_text, len(delta.text))
            delta = dataclasses.replace(delta, text=delta.text[cut:])
            self.skip_text -= cut
        if delta.token_ids or delta.text or delta.finish_reason or delta.request_finished:
            if self.handoff_s is not None:
                delta, self.handoff_s = dataclasses.replace(delta, handoff_s=self.handoff_s), None
            return delta
        return None
