"""How the gateway talks to an engine instance: the `EngineClient` interface.

Lifecycle of one request through a client:
  generate(request) -> submitted -> deltas yielded -> last delta (finished)
  Leaving the iteration early (client gone, cancel, error) aborts the request
  in the engine, so its KV blocks are freed; nobody else has to remember to.

`RayEngineClient` reads the worker's single batched output stream in one pump
task and hands each delta to the queue of the request it belongs to. The
stream is the worker's direct channel (`pdserve.worker.channel`: one socket,
a frame per engine step), or Ray's streaming call where the channel cannot
be opened.
`pdserve.worker.fake_engine.FakeEngineClient` implements the same interface
in-process for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Callable

from pdserve.shared.errors import EngineDeadError, EngineError, InvalidRequestError
from pdserve.shared.protocol import EngineInfo, EngineRequest, EngineStats, OutputDelta
from pdserve.shared.roles import InstanceState
from pdserve.worker.channel import CONNECT_TIMEOUT_S, ChannelClosed, ChannelRefused, read_batches

logger = logging.getLogger(__name__)


class EngineClient(ABC):
    """One engine instance, as seen from the gateway."""

    info: EngineInfo

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        """Submit and yield the request's deltas until every choice finished.

        Raises `EngineError` (the engine failed the request) or
        `EngineDeadError` (the instance is gone). Closing the iterator early
        aborts the request in the engine.
        """

    @abstractmethod
    async def abort(self, request_ids: list[str]) -> None: ...

    @abstractmethod
    async def stats(self) -> EngineStats: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def restart(self) -> EngineInfo:
        """Bring a new engine up in place of a dead one (the controller's repair)."""
        raise EngineError(f"instance {self.instance_id} cannot be restarted")

    async def inject_fault(self, fault: str) -> list[int]:
        """Test hook: `kill`, `freeze` or `thaw` the engine (only where fault hooks are on)."""
        raise EngineError(f"instance {self.instance_id} has no fault hooks")


def delta_error(delta: OutputDelta) -> EngineError | InvalidRequestError:
    """The typed error an engine's error delta stands for."""
    message = delta.error or "engine error"
    if delta.error_kind == "invalid":
        return InvalidRequestError(message)
    if delta.error_kind == "dead":
        return EngineDeadError(message)
    return EngineError(message)


_END = object()  # queue sentinel: the instance died
_LOST = object()  # queue sentinel: the output channel broke; this request's deltas may be lost (the instance lives)
MAX_EMPTY_REOPENS = 3  # a channel that closes this many times in a row with nothing read is broken for good


class RayEngineClient(EngineClient):
    """Client of an `EngineWorker` Ray actor."""

    def __init__(self, actor: Any, info: EngineInfo, respawn: Callable[[], Any] | None = None) -> None:
        self.actor = actor
        self.info = info
        self._respawn = respawn  # a new actor for this instance, when the old one died
        self._queues: dict[str, asyncio.Queue] = {}
        self._pump: asyncio.Task | None = None
        self._dead: str | None = None
        self.channel_reconnects = 0  # the output channel broke and was opened again (the actor lived)

    def _ensure_pump(self) -> None:
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def _run_pump(self) -> None:
        try:
            async for batch in self._batches():
                if batch is None:  # the channel broke and is reopened: whatever was in flight may be gone
                    for queue in self._queues.values():
                        queue.put_nowait(_LOST)
                    continue
                for delta in batch:
                    queue = self._queues.get(delta.request_id)
                    if queue is not None:  # else: aborted and forgotten already
                        queue.put_nowait(delta)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # actor died or Ray failed: every waiting request fails fast
            self._dead = f"instance {self.instance_id} failed: {type(exc).__name__}: {exc}"
            logger.error(self._dead)
        for queue in self._queues.values():
            queue.put_nowait(_END)

    async def _batches(self) -> AsyncIterator[list[OutputDelta] | None]:
        """The worker's output batches: over its direct channel, or Ray's streaming call where it has none.

        The channel ending while the actor still answers is a broken connection, not a death: None
        (the requests in flight may have lost deltas, they fail), then it is opened again. An actor
        that does not answer is dead (the caller's error path).
        """
        empty_reopens = 0
        while True:
            address = None
            with contextlib.suppress(Exception):  # no channel (an older worker) or no answer: Ray streaming
                address = await asyncio.wait_for(self.actor.output_channel.remote(), CONNECT_TIMEOUT_S)
            if address is None:
                break
            try:
                async for batch in read_batches(address):
                    empty_reopens = 0
                    yield batch
            except ChannelRefused as exc:
                logger.warning("instance %s: %s; its outputs come through Ray instead", self.instance_id, exc)
                break
            except ChannelClosed:
                await asyncio.wait_for(self.actor.info.remote(), CONNECT_TIMEOUT_S)  # raises if the actor died
                empty_reopens += 1
                if empty_reopens > MAX_EMPTY_REOPENS:
                    raise
                self.channel_reconnects += 1
                yield None  # the requests in flight now fail (their aborts free their blocks); new ones go on
                logger.warning("instance %s: output channel closed while its actor lives; reopening",
                               self.instance_id)
        async for ref in self.actor.outputs.remote():
            yield await ref

    async def generate(self, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        if self._dead:
            raise EngineDeadError(self._dead)
        self._ensure_pump()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            await self.actor.submit.remote(request)
            while not finished:
                delta = await queue.get()
                if delta is _LOST:
                    raise EngineError(f"instance {self.instance_id}: its output channel broke mid-request")
                if delta is _END:
                    raise EngineDeadError(self._dead or f"instance {self.instance_id} stopped")
                if delta.error:
                    finished = True
                    raise delta_error(delta)
                finished = delta.request_finished
                yield delta
        finally:
            self._queues.pop(request.request_id, None)
            if not finished and not self._dead:
                # Shielded: the caller may be in the middle of being cancelled.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.abort([request.request_id]))

    async def abort(self, request_ids: list[str]) -> None:
        await self.actor.abort.remote(request_ids)

    async def stats(self) -> EngineStats:
        if self._dead:
            return EngineStats(self.instance_id, self.info.role, healthy=False, state=InstanceState.DEAD)
        return await self.actor.stats.remote()

    async def inject_fault(self, fault: str) -> list[int]:
        return await self.actor.signal_engine.remote(fault)

    async def restart(self) -> EngineInfo:
        from ray.exceptions import RayActorError

        if self._dead is None:
            try:
                self.info = await self.actor.restart.remote()  # the actor lives: a new engine inside it
                return self.info
            except RayActorError as exc:
                self._dead = f"instance {self.instance_id}'s actor died: {exc}"
        if self._respawn is None:
            raise EngineDeadError(self._dead)
        actor = self._respawn()
        self.info = await actor.start.remote()
        self.actor, self._dead, self._pump = actor, None, None  # the next request starts a new pump
        return self.info

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump

