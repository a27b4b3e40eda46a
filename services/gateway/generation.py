"""One API request's run through the cluster: placement, engine streams, metrics.

Lifecycle:
  prepared (token ids, sampling params, SLO) -> placed (router: admission may wait or refuse, 429)
  -> dispatched
  -> deltas merged from every prompt's engine stream -> finished
  | rejected (no placement) | error (engine failed) | aborted (client left)
Whatever ends the iteration, every engine request still running is aborted
(its KV blocks freed) and the lifecycle is recorded in the metrics once.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from pdserve.router.controller import Route, Router
from pdserve.router.snapshot import RequestInfo
from pdserve.shared.errors import PdserveError
from pdserve.shared.lifecycle import Outcome, RequestLifecycle
from pdserve.shared.metrics import Metrics
from pdserve.shared.protocol import EngineRequest, OutputDelta, TokenLogprob
from pdserve.shared.slo import RequestSlo
from pdserve.shared.slo_metrics import SloMetrics
from pdserve.shared.streams import END, drain


@dataclass
class ChoiceState:
    """Everything one choice produced so far (for non-streaming responses)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: OutputDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


@dataclass
class Generation:
    """Runs the engine requests of one API request (one per prompt) and merges them."""

    router: Router
    metrics: Metrics
    request_id: str
    prompts: list[list[int]]
    sampling_params: Any
    max_tokens: int
    slo: RequestSlo | None = None  # None: the router's defaults
    slo_metrics: SloMetrics | None = None
    life: RequestLifecycle = field(init=False)
    finish_reasons: list[str] = field(default_factory=list)
    _placements: list[Route] = field(default_factory=list)
    # Per prompt: the prompt tokens its first delta says were not computed (vLLM's num_cached_tokens). The
    # first delta is from the engine that computed the prompt (P under disaggregation): D's own count would
    # include the KV it received.
    _cached: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.life = RequestLifecycle(self.request_id, num_prompt_tokens=sum(map(len, self.prompts)))

    @property
    def n(self) -> int:
        return self.sampling_params.n or 1

    @property
    def num_prompt_tokens(self) -> int:
        return self.life.num_prompt_tokens

    def reject(self) -> None:
        """Record a request refused before it reached an engine."""
        self.life.finish(Outcome.REJECTED)
        self.metrics.observe_request(self.life, [])

    async def place(self) -> None:
        """Choose an instance for every prompt; a `PdserveError` means nothing reached an engine.

        Called before any response byte is sent, so a refusal (a 429 from admission control) keeps
        its HTTP status. A prompt refused after others were placed gives their placements back.
        """
        placed = []
        try:
            for i, p in enumerate(self.prompts):
                placed.append(await self.router.admit(
                    RequestInfo(f"{self.request_id}-{i}", len(p), self.max_tokens, self.life.arrival, self.slo), p))
        except BaseException as exc:
            for route in placed:
                self.router.release(route)
            if isinstance(exc, PdserveError):
                self.reject()
            raise
        self._placements = placed

    async def deltas(self) -> AsyncIterator[tuple[int, OutputDelta]]:
        """(choice index across all prompts, delta), in arrival order."""
        if not self._placements:
            await self.place()
        self.life.mark_dispatched()
        outcome = Outcome.ERROR
        try:
            # One prompt (nearly every request): its stream directly, no task and queue hop per delta.
            merged = self._single() if len(self._placements) == 1 else self._merged()
            async with contextlib.aclosing(merged) as stream:
                async for prompt_index, item in stream:
                    self._record(item)
                    self._record_cached(prompt_index, item)
                    ticket = self._placements[prompt_index].ticket
                    if ticket is not None and item.token_ids:
                        # the first token ends the prompt's prefill: it stops counting in P's queue
                        self.router.tokens(ticket, len(item.token_ids))
                    yield prompt_index * self.n + item.index, item
            outcome = Outcome.OK
        except (asyncio.CancelledError, GeneratorExit):
            outcome = Outcome.ABORTED
            raise
        finally:
            self.life.finish(outcome)
            self.metrics.observe_request(self.life, self.finish_reasons)
            if self.slo_metrics is not None:
                self.slo_metrics.observe_request(self.slo, self.life)

    async def _single(self) -> AsyncIterator[tuple[int, OutputDelta]]:
        route, prompt = self._placements[0], self.prompts[0]
        request = EngineRequest(f"{self.request_id}-0", prompt, self.sampling_params)
        with self.router.track(route, len(prompt)):
            # Closing this closes the engine stream, which aborts the engine request (shielded there).
            async with contextlib.aclosing(self.router.stream(route, request)) as stream:
                async for delta in stream:
                    yield 0, delta

    async def _merged(self) -> AsyncIterator[tuple[int, OutputDelta]]:
        """Several prompts: every engine stream drained by a task of its own into one queue."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._run_one(i, route, queue)) for i, route in enumerate(self._placements)]
        try:
            remaining = len(tasks)
            while remaining:
                prompt_index, item = await queue.get()
                if item is END:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield prompt_index, item
        finally:
            for task in tasks:
                task.cancel()
            # Wait for the aborts to reach the engines (shielded inside the clients).
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_one(self, prompt_index: int, route: Route, queue: asyncio.Queue) -> None:
        prompt = self.prompts[prompt_index]
        request = EngineRequest(f"{self.request_id}-{prompt_index}", prompt, self.sampling_params)
        with self.router.track(route, len(prompt)):
            await drain(lambda: self.router.stream(route, request), queue, prompt_index)

    def _record_cached(self, prompt_index: int, delta: OutputDelta) -> None:
        if prompt_index in self._cached or not delta.num_prompt_tokens:
            return  # counted once per prompt (n > 1 choices share it); error deltas carry no counts
        self._cached[prompt_index] = delta.num_cached_tokens
        route = self._placements[prompt_index]
        self.metrics.observe_prefix(route.prefill.info.role, delta.num_prompt_tokens, delta.num_cached_tokens)

    @property
    def num_cached_tokens(self) -> int:
        return sum(self._cached.values())

    def _record(self, delta: OutputDelta) -> None:
        self.life.mark_tokens(len(delta.token_ids))
        if delta.queue_time_s is not None and self.life.queue_time_s is None:
            self.life.queue_time_s = delta.queue_time_s
        if delta.handoff_s is not None:
            self.life.handoff_s = delta.handoff_s
        if delta.finish_reason is not None:
            self.finish_reasons.append(delta.finish_reason)

    async def collect(self) -> list[ChoiceState]:
        """Run to the end; every choice's accumulated output, by choice index."""
        choices = [ChoiceState() for _ in range(len(self.prompts) * self.n)]
        async with contextlib.aclosing(self.deltas()) as stream:
            async for index, delta in stream:
                choices[index].add(delta)
        return choices

    @property
    def num_output_tokens(self) -> int:
        return self.life.num_output_tokens
