"""Resumable streams: a request's output goes on when the instance producing it dies or is moved.

Lifecycle of one stream (`ResumableStream.deltas()`):
  registered -> upstream (one engine's stream, or a P->D handoff) -> deltas to the client
  -> [seam: upstream died (`EngineDeadError`), or `move()` at a token boundary]
  -> continuation upstream on another instance: prompt + generated tokens as its prompt,
     max_tokens/min_tokens less what was generated -> ... -> finished | failed | client gone
  -> unregistered, every upstream closed (which aborts its engine request: blocks freed).
What the client has been sent is recorded exactly (token ids, text, logprobs count, finish),
so the stream after a seam repeats, loses and reorders nothing, and `usage` stays the whole.

Stop strings: an engine checks them only on text it produced, so one that starts before a
seam would go unseen by the continuation's engine. The stream therefore asks engines to keep
stop strings in their text (`include_stop_str_in_output`, no hold-back of their own) and does
the hold-back and the cut itself; after a seam it also looks for stop strings across it.

Recoveries are bounded (`StreamResumeConfig.max_resumes`), each continuation's first token has a
deadline (`timeout_s`), and when no instance can take the request the stream ends with the
engine's error as before. Seeded sampled requests restart their generator on the new instance
(tokens after the seam differ from an unresumed run); greedy ones are token-identical.
`move()` is the API migration uses: see /work/notes/issue11-interface.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from pdserve.router.snapshot import ClusterSnapshot
from pdserve.shared.config import StreamResumeConfig
from pdserve.shared.errors import EngineDeadError, EngineError, PdserveError
from pdserve.shared.protocol import EngineRequest, OutputDelta
from pdserve.shared.roles import Role
from pdserve.shared.streams import END, drain
from pdserve.worker.client import EngineClient

logger = logging.getLogger(__name__)

_MOVE = object()  # queue tag: a move was asked for (wakes a loop waiting on its upstream)
_ROLE_RANK = {Role.DECODE: 0, Role.MIXED: 1, Role.PREFILL: 2}  # where a continuation runs best

Prepare = Callable[["Seam"], Awaitable[EngineRequest | None]]
Pick = Callable[[set[str], int], EngineClient | None]  # (instances to avoid, prompt tokens) -> where


class MoveAborted(PdserveError):
    """A `move()` did not happen; the stream goes on where it was. `stage`: rejected, timeout, prepare."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"move not done ({stage}): {message}")
        self.stage = stage


@dataclass(frozen=True)
class Seam:
    """Where a stream changes instance: what the client has, and the continuation to start."""

    request_id: str
    source: str | None
    target: str
    generated: tuple[int, ...]
    request: EngineRequest
    reason: str  # "dead" (a recovery), or the mover's reason ("migration", "drain", ...)


def choose_target(snapshot: ClusterSnapshot, exclude: set[str], prompt_tokens: int) -> str | None:
    """The instance to continue a stream on (pure): healthy, not excluded; decode first, then the
    ones with KV room for the continuation's prompt, then the least loaded."""
    best, best_key = None, None
    for inst in snapshot.instances:
        if not inst.healthy or inst.instance_id in exclude:
            continue
        room = inst.kv_blocks_free * inst.block_size >= prompt_tokens if inst.kv_blocks_total else True
        key = (not room, _ROLE_RANK.get(inst.role, 3), inst.outstanding + inst.num_waiting,
               -inst.kv_blocks_free, inst.instance_id)
        if best_key is None or key < best_key:
            best, best_key = inst.instance_id, key
    return best


class StreamRegistry:
    """The live resumable streams by request id (what migration looks streams up in)."""

    def __init__(self) -> None:
        self._streams: dict[str, ResumableStream] = {}

    def add(self, stream: "ResumableStream") -> None:
        self._streams[stream.request_id] = stream

    def remove(self, stream: "ResumableStream") -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    def get(self, request_id: str) -> "ResumableStream | None":
        return self._streams.get(request_id)

    def live(self) -> list["ResumableStream"]:
        return list(self._streams.values())

    def on(self, instance_id: str) -> list["ResumableStream"]:
        return [s for s in self._streams.values() if s.instance_id == instance_id]

    def __len__(self) -> int:
        return len(self._streams)


@dataclass
class StreamRecovery:
    """The router's half: config, the registry, and counters (`pdserve:stream_recoveries_total`)."""

    config: StreamResumeConfig = field(default_factory=StreamResumeConfig)
    streams: StreamRegistry = field(default_factory=StreamRegistry)
    # outcome -> count: resumed (a continuation's first token came), completed (a resumed stream
    # finished), timeout (a continuation stayed silent), no_instance, limit (gave up)
    counters: dict[str, int] = field(default_factory=dict)
    moves: dict[str, int] = field(default_factory=dict)  # moved, aborted_<stage>

    def wrap(self, request: EngineRequest, open_stream: Callable[[EngineRequest], AsyncIterator[OutputDelta]],
             where: Callable[[], tuple[str, str]], pick: Pick) -> AsyncIterator[OutputDelta]:
        """`open_stream(request)`'s deltas, resumable; `where()`: (instance, its request id) producing them."""
        if (request.sampling_params.n or 1) > 1:
            return open_stream(request)  # several sequences per request: neither resumable nor movable
        return ResumableStream(request, open_stream, where, pick, self).deltas()


def _clone(params: Any, **changes: Any) -> Any:
    clone = params.clone()
    for name, value in changes.items():
        setattr(clone, name, value)
    return clone


def _stops(params: Any) -> list[str]:
    stop = params.stop
    return [stop] if isinstance(stop, str) else list(stop or [])


@dataclass
class _Move:
    target: EngineClient
    prepare: Prepare | None
    at_tokens: int | None
    timeout_s: float
    reason: str
    result: asyncio.Future
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False


class ResumableStream:
    """One request's stream across any number of upstream switches (see the module docstring)."""

    def __init__(self, request: EngineRequest, open_stream: Callable[[EngineRequest], AsyncIterator[OutputDelta]],
                 where: Callable[[], tuple[str, str]], pick: Pick, recovery: StreamRecovery) -> None:
        self.request, self._open, self._where, self._pick, self._rec = request, open_stream, where, pick, recovery
        params = request.sampling_params
        self._stop_strings = _stops(params)
        self._include = bool(params.include_stop_str_in_output)
        # The engine keeps stop strings in its text and holds nothing back; this stream does both.
        self._hold = max(map(len, self._stop_strings)) - 1 if self._stop_strings and not self._include else 0
        self._engine_params = params if not self._stop_strings or self._include else _clone(
            params, include_stop_str_in_output=True, output_text_buffer_length=0)
        self.generated: list[int] = []
        self.logprobs_sent = 0
        self._text = ""  # all text the upstreams produced (stop strings kept)
        self._released = 0  # characters of it the client has
        self._seam_at: int | None = None  # text offset of the last seam
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._tag = 0
        self._awaiting_first: float | None = None  # a continuation's start: its first delta is due by then
        self._resumes = 0
        self._seams = 0
        self._failed_on: set[str] = set()
        self._move: _Move | None = None
        self._paused = False  # the upstream was stopped under us (finish_reason "abort"): a move is due

    # -- what migration reads ------------------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def instance_id(self) -> str:
        return self._where()[0]

    @property
    def engine_request_id(self) -> str:
        return self._where()[1]

    @property
    def moving(self) -> bool:
        return self._move is not None

    # -- the client's side ---------------------------------------------------------------------
    async def deltas(self) -> AsyncIterator[OutputDelta]:
        self._rec.streams.add(self)
        try:
            first = dataclasses.replace(self.request, sampling_params=self._engine_params)
            self._task = asyncio.create_task(drain(lambda: self._open(first), self._queue, self._tag))
            while not self.finished:
                out = await self._step()
                if out is not None:
                    yield out
            if self._resumes:
                self._count("completed")
        finally:
            self._rec.streams.remove(self)
            move, self._move = self._move, None
            if move is not None and not move.result.done():
                move.reached.set()
                move.result.set_exception(MoveAborted("rejected", "the stream ended"))
            await self._close_upstream()

    async def _step(self) -> OutputDelta | None:
        move = self._move
        if move is not None and (move.at_tokens is None or len(self.generated) >= move.at_tokens):
            await self._apply_move(move)
            return None
        tag, item = await self._next()
        if tag is _MOVE or tag != self._tag:
            return None  # a move's wake-up, or a closed upstream's leftovers
        if item is END and self._paused:
            return None  # stopped from under us (migration): a move, or the deadline, comes next
        if item is END:
            item = EngineError(f"instance {self.instance_id} ended the stream early")
        if isinstance(item, BaseException):
            await self._recover(item)
            return None
        return await self._on_delta(item)

    async def _next(self) -> tuple[Any, Any]:
        if self._awaiting_first is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), max(self._awaiting_first - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            self._count("timeout")
            return self._tag, EngineDeadError(f"instance {self.instance_id} gave no token within "
                                              f"{self._rec.config.timeout_s:.0f} s of the continuation's start")

    async def _on_delta(self, delta: OutputDelta) -> OutputDelta | None:
        if delta.finish_reason == "abort":
            return self._on_stopped(delta)
        if self._awaiting_first is not None:
            self._awaiting_first = None
            if self._resumes:
                self._count("resumed")
        start = len(self._text)
        self.generated.extend(delta.token_ids)
        self.logprobs_sent += len(delta.logprobs or ())
        self._text += delta.text
        finish, reason = delta.finish_reason, delta.stop_reason
        end = None  # the final text length, once the request is over
        across = self._stop_across_seam(start) if finish is None or finish == "length" else None
        if across is not None:
            reason, cut = across
            finish, end = "stop", cut
        elif finish is not None or delta.request_finished:
            end = len(self._text)
            forced = self._engine_params is not self.request.sampling_params
            if finish == "stop" and isinstance(reason, str) and forced and reason in self._stop_strings:
                found = self._text.rfind(reason)  # the engine kept it (we asked): the client does not
                end = found if found >= 0 else end
            elif finish == "stop" and forced and len(delta.token_ids) == 1:
                end = start  # EOS or a stop token: its text is not output (the engine kept it as we asked)
        if end is not None:
            self._text, self.finished = self._text[:end], True
            text = self._text[self._released:]
        else:
            text = self._text[self._released:max(len(self._text) - self._hold, self._released)]
        self._released += len(text)
        if across is not None:
            await self._close_upstream()  # the engine did not see it: it would go on
        if not (delta.token_ids or text or end is not None or delta.handoff_s is not None):
            return None
        # In place (no copy per token): each delta is this stream's alone once its client queued it.
        delta.text, delta.finish_reason, delta.stop_reason = text, finish, reason
        delta.request_finished = self.finished
        if self._seams:
            delta.num_prompt_tokens = len(self.request.prompt_token_ids)
        return delta

    def _on_stopped(self, delta: OutputDelta) -> OutputDelta | None:
        """The engine ended the request without being asked by us (our aborts close the stream before any
        answer): migration stopped it on the source. Its tokens count; the client's stream does not end.
        A move is due: if none comes by the deadline the instance counts as failed (recovery)."""
        self._paused = True
        self._awaiting_first = time.monotonic() + self._rec.config.timeout_s
        if not delta.token_ids:
            return None
        self.generated.extend(delta.token_ids)
        self.logprobs_sent += len(delta.logprobs or ())
        self._text += delta.text
        text = self._text[self._released:max(len(self._text) - self._hold, self._released)]
        self._released += len(text)
        delta.text, delta.finish_reason, delta.stop_reason, delta.request_finished = text, None, None, False
        return delta

    def _stop_across_seam(self, start: int) -> tuple[str, int] | None:
        """A stop string starting before the last seam and complete now: (it, the text's new end)."""
        if self._seam_at is None or not self._stop_strings or start >= self._seam_at + max(map(len, self._stop_strings)):
            return None
        if len(self.generated) <= (self.request.sampling_params.min_tokens or 0):
            return None
        best = None
        for stop in self._stop_strings:
            at = self._text.find(stop, max(start - len(stop) + 1, 0))
            if at != -1 and at < self._seam_at and (best is None or at + len(stop) < best[1] + len(best[0])):
                best = (stop, at)
        if best is None:
            return None
        stop, at = best
        return stop, at + len(stop) if self._include else at

    # -- seams ---------------------------------------------------------------------------------
    def _seam(self, target: str, reason: str) -> Seam:
        user = self.request.sampling_params
        done = len(self.generated)
        params = _clone(self._engine_params, prompt_logprobs=None, min_tokens=max((user.min_tokens or 0) - done, 0))
        if user.max_tokens is not None:
            params.max_tokens = user.max_tokens - done
        self._seams += 1
        tag = "r" if reason == "dead" else "m"
        request = EngineRequest(f"{self.request_id}-{tag}{self._seams}",
                                [*self.request.prompt_token_ids, *self.generated], params, self.request.arrival_time)
        self._seam_at = len(self._text)
        return Seam(self.request_id, self.instance_id, target, tuple(self.generated), request, reason)

    async def _switch(self, client: EngineClient, request: EngineRequest) -> None:
        """Start `request` on `client` as the upstream, then close the old one (aborting it there)."""
        old = self._task
        self._tag += 1
        self._task = asyncio.create_task(drain(lambda: client.generate(request), self._queue, self._tag))
        self._where = lambda: (client.instance_id, request.request_id)
        self._paused = False
        self._awaiting_first = time.monotonic() + self._rec.config.timeout_s
        if old is not None:
            old.cancel()
            with contextlib.suppress(BaseException):
                await old

    async def _close_upstream(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # closing its stream aborts the engine request
            with contextlib.suppress(BaseException):
                await task

    def _count(self, outcome: str) -> None:
        self._rec.counters[outcome] = self._rec.counters.get(outcome, 0) + 1

    async def _recover(self, exc: BaseException) -> None:
        """The upstream failed: continue on another instance, or raise (the client's error event)."""
        switched = self._seams > 0 and self._awaiting_first is not None
        if not (isinstance(exc, EngineDeadError) or (switched and type(exc) is EngineError)):
            raise exc  # the engine refused or failed this request itself: another would too
        source = self.instance_id
        self._failed_on.add(source)
        await self._close_upstream()
        max_tokens = self.request.sampling_params.max_tokens
        if self._resumes >= self._rec.config.max_resumes or not self._rec.config.enabled:
            self._count("limit")
            raise EngineDeadError(f"{exc} (no more recoveries: {self._resumes} made)") from exc
        prompt_tokens = len(self.request.prompt_token_ids) + len(self.generated)
        target = self._pick(set(self._failed_on), prompt_tokens)
        if target is None:
            self._count("no_instance")
            raise EngineDeadError(f"{exc} (no healthy instance left to continue on)") from exc
        if max_tokens is not None and len(self.generated) >= max_tokens:
            raise EngineError(f"{exc} (after every token was sent, before the finish)") from exc
        seam = self._seam(target.instance_id, "dead")
        self._resumes += 1
        logger.warning("request %s: %s failed after %d tokens (%s); continuing on %s by recompute (%d/%d)",
                       self.request_id, source, len(self.generated), exc, target.instance_id, self._resumes,
                       self._rec.config.max_resumes)
        await self._switch(target, seam.request)

    # -- migration's API -----------------------------------------------------------------------
    async def move(self, target: EngineClient, prepare: Prepare | None = None, *, at_tokens: int | None = None,
                   timeout_s: float = 30.0, reason: str = "migration") -> Seam:
        """Switch this stream to `target` at a token boundary (see /work/notes/issue11-interface.md)."""
        if self.finished or self._move is not None:
            self._rec.moves["aborted_rejected"] = self._rec.moves.get("aborted_rejected", 0) + 1
            raise MoveAborted("rejected", "the stream is finished" if self.finished else "a move is pending")
        move = _Move(target, prepare, at_tokens, timeout_s, reason, asyncio.get_running_loop().create_future())
        self._move = move
        self._queue.put_nowait((_MOVE, None))
        try:
            await asyncio.wait_for(move.reached.wait(), timeout_s)
        except asyncio.TimeoutError:
            if not move.reached.is_set():
                move.cancelled = True
                if self._move is move:
                    self._move = None
                self._rec.moves["aborted_timeout"] = self._rec.moves.get("aborted_timeout", 0) + 1
                raise MoveAborted("timeout", f"no token boundary within {timeout_s} s") from None
        return await move.result

    async def _apply_move(self, move: _Move) -> None:
        self._move = None
        if move.cancelled:
            return
        move.reached.set()
        seams, seam_at = self._seams, self._seam_at
        seam = self._seam(move.target.instance_id, move.reason)
        try:
            request = seam.request
            if move.prepare is not None:
                request = await asyncio.wait_for(move.prepare(seam), move.timeout_s)
            if request is None:
                raise MoveAborted("prepare", "prepare called the move off")
        except asyncio.CancelledError:
            if not move.result.done():
                move.result.set_exception(MoveAborted("prepare", "the client left"))
            raise
        except Exception as exc:  # noqa: BLE001 - the mover's failure: reported to it, the stream goes on
            self._seams, self._seam_at = seams, seam_at
            self._rec.moves["aborted_prepare"] = self._rec.moves.get("aborted_prepare", 0) + 1
            logger.warning("request %s: move to %s called off: %s", self.request_id, move.target.instance_id, exc)
            move.result.set_exception(exc if isinstance(exc, MoveAborted) else MoveAborted("prepare", str(exc)))
            return
        await self._switch(move.target, request)
        self._rec.moves["moved"] = self._rec.moves.get("moved", 0) + 1
        logger.info("request %s moved %s -> %s after %d tokens (%s)", self.request_id, seam.source,
                    move.target.instance_id, len(seam.generated), move.reason)
        move.result.set_result(seam)
