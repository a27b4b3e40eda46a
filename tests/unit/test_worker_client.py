"""RayEngineClient's demultiplexing, abort-on-close and death handling, with a fake actor."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from pdserve.shared.config import EngineConfig
from pdserve.shared.errors import ConfigError, EngineDeadError, EngineError
from pdserve.shared.protocol import EngineInfo, EngineRequest, OutputDelta
from pdserve.shared.roles import Role
from pdserve.worker.client import RayEngineClient


class _Method:
    def __init__(self, fn):
        self.remote = fn


class FakeActor:
    """Mimics an EngineWorker actor handle: `.method.remote(...)` returns awaitables."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.submitted: list[str] = []
        self.aborted: list[str] = []
        self.submit = _Method(self._submit)
        self.abort = _Method(self._abort)
        self.outputs = _Method(self._outputs)

    async def _submit(self, request: EngineRequest) -> None:
        self.submitted.append(request.request_id)

    async def _abort(self, ids: list[str]) -> None:
        self.aborted.extend(ids)

    async def _outputs(self):
        while True:
            batch = await self.outbox.get()
            if isinstance(batch, Exception):
                raise batch
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(batch)
            yield fut


def _client(actor: FakeActor) -> RayEngineClient:
    return RayEngineClient(actor, EngineInfo("mixed-0", Role.MIXED, "m", 128, 16, 64))


def _delta(rid: str, text: str, finished: bool = False, error: str | None = None) -> OutputDelta:
    return OutputDelta(rid, 0, [1], text, finish_reason="length" if finished else None,
                       request_finished=finished, error=error)


async def _collect(client, rid):
    return [d.text async for d in client.generate(EngineRequest(rid, [1, 2], None))]


async def test_batches_are_routed_to_their_requests():
    actor = FakeActor()
    client = _client(actor)
    a = asyncio.create_task(_collect(client, "a"))
    b = asyncio.create_task(_collect(client, "b"))
    await asyncio.sleep(0.01)
    actor.outbox.put_nowait([_delta("a", "a1"), _delta("b", "b1"), _delta("zombie", "x")])
    actor.outbox.put_nowait([_delta("b", "b2", finished=True), _delta("a", "a2", finished=True)])
    assert await a == ["a1", "a2"] and await b == ["b1", "b2"]
    assert actor.aborted == []  # finished requests need no abort
    await client.close()


async def test_closing_early_aborts_in_the_engine():
    actor = FakeActor()
    client = _client(actor)
    stream = client.generate(EngineRequest("r", [1], None))
    first = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0.01)
    actor.outbox.put_nowait([_delta("r", "t1")])
    assert (await first).text == "t1"
    await stream.aclose()
    assert actor.aborted == ["r"]
    await client.close()


async def test_engine_error_and_actor_death():
    actor = FakeActor()
    client = _client(actor)
    failing = asyncio.create_task(_collect(client, "bad"))
    await asyncio.sleep(0.01)
    actor.outbox.put_nowait([_delta("bad", "", finished=True, error="ValueError: boom")])
    with pytest.raises(EngineError, match="boom"):
        await failing
    waiting = asyncio.create_task(_collect(client, "w"))
    await asyncio.sleep(0.01)
    actor.outbox.put_nowait(RuntimeError("actor died"))
    with pytest.raises(EngineDeadError, match="actor died"):
        await waiting
    assert not (await client.stats()).healthy
    with pytest.raises(EngineDeadError):
        await _collect(client, "later")
    await client.close()


def test_engine_args_from_config():
    from pdserve.worker.engine import CPU_MEMORY_FRACTION, build_engine_args

    args = build_engine_args(EngineConfig(model="/m", max_model_len=256, engine_args={"max_logprobs": 50}))
    assert args.model == "/m" and args.max_model_len == 256 and args.max_logprobs == 50
    assert args.gpu_memory_utilization == CPU_MEMORY_FRACTION  # this machine is a CPU one
    assert args.disable_log_stats is False
    with pytest.raises(ConfigError, match="no_such_arg"):
        build_engine_args(EngineConfig(model="/m", engine_args={"no_such_arg": 1}))


class _Choice:
    def __init__(self, index: int, token: int, finish: str | None) -> None:
        self.index, self.token_ids, self.text = index, [token], f"t{token}"
        self.finish_reason, self.stop_reason, self.logprobs = finish, None, None


class _Output:
    def __init__(self, choices: list[_Choice], finished: bool) -> None:
        self.request_id, self.outputs, self.finished = "r", choices, finished
        self.prompt_token_ids, self.num_cached_tokens, self.metrics = [1, 2], 0, None


class _FakeAsyncLLM:
    """Yields what vLLM yields for n=2 in DELTA mode: both choices finishing in one output."""

    def generate(self, prompt, params, request_id):
        async def outputs():
            yield _Output([_Choice(0, 5, None), _Choice(1, 6, None)], finished=False)
            yield _Output([_Choice(0, 7, "length"), _Choice(1, 8, "length")], finished=True)

        return outputs()


async def test_worker_marks_only_the_last_delta_of_a_request_finished():
    from pdserve.worker.engine import EngineWorker

    worker = EngineWorker("mixed-0", Role.MIXED, EngineConfig(model="/m"))
    worker._engine, worker._outbox = _FakeAsyncLLM(), asyncio.Queue()
    await worker._run(EngineRequest("r", [1, 2], None))
    deltas = [worker._outbox.get_nowait() for _ in range(worker._outbox.qsize())]
    assert [(d.index, d.token_ids, d.request_finished) for d in deltas] == [
        (0, [5], False), (1, [6], False), (0, [7], False), (1, [8], True)]
    assert (await worker.stats()).in_flight == 0


class _SilentEngine:
    """An engine core that is alive (not errored) but answers no load probe: hung, or frozen."""

    errored = False

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.engine_core = self

    async def call_utility_async(self, method: str, *args):
        from pdserve.worker.vllm_plugin import LOAD_PROBE

        assert method == LOAD_PROBE
        if not self.answers:
            await asyncio.Event().wait()
        return 0, 0, 0.0, []


@pytest.mark.parametrize("answers", [True, False])
async def test_an_engine_core_that_stops_answering_is_reported_dead(answers):
    from pdserve.shared.roles import InstanceState
    from pdserve.worker.engine import EngineWorker

    worker = EngineWorker("decode-0", Role.DECODE, EngineConfig(model="/m", stall_timeout_s=0.3))
    worker._engine, worker._outbox = _SilentEngine(answers), asyncio.Queue()
    worker._state, worker._answered_at = InstanceState.READY, time.monotonic()
    states = []
    for _ in range(8):
        states.append((await worker.stats()).state)
        await asyncio.sleep(0.1)
    if answers:
        assert set(states) == {InstanceState.READY}
    else:
        assert states[0] is InstanceState.READY and states[-1] is InstanceState.DEAD
        assert not (await worker.stats()).healthy


class _IdleEngine:
    """An idle engine core whose last step saw one waiting request that an abort removed since."""

    errored = False

    def __init__(self) -> None:
        self.engine_core = self

    async def call_utility_async(self, method: str, *args):
        return 0, 0, 0.0, []


async def test_stats_come_from_the_load_probe_not_the_last_step():
    """vLLM's stat logger only records on steps: an idle engine's last step would stand forever."""
    from pdserve.shared.roles import InstanceState
    from pdserve.worker.engine import EngineWorker

    worker = EngineWorker("decode-0", Role.DECODE, EngineConfig(model="/m"))
    worker._engine, worker._outbox = _IdleEngine(), asyncio.Queue()
    worker._state, worker._answered_at = InstanceState.READY, time.monotonic()
    worker._stats.num_waiting, worker._stats.kv_usage = 1, 0.25  # what the last step reported
    await worker.stats()  # sends the probe
    await asyncio.sleep(0.05)
    stats = await worker.stats()  # reads its answer
    assert (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0.0)


class _CoreWithOrphan:
    """An engine core still holding requests (waiting for KV) that no request task reads any more: one
    its front end has forgotten, one it still holds (a cancel that landed inside vLLM's add)."""

    errored = False

    def __init__(self) -> None:
        self.engine_core = self
        self.output_processor = self
        state = types.SimpleNamespace
        self.request_states = {"live-1-abcd1234": state(external_req_id="live-1"),  # its task reads it
                               "held-3-0a0b0c0d": state(external_req_id="held-3")}  # no task
        self.core = {"live-1-abcd1234", "gone-2-ef567890", "held-3-0a0b0c0d"}
        self.aborted: list[str] = []

    async def call_utility_async(self, method: str, *args):
        return 0, len(self.core), 0.1, sorted(self.core)

    async def abort(self, ids, internal=False):
        assert internal  # core ids are vLLM's internal ids
        self.aborted.extend(ids)
        self.core -= set(ids)
        for rid in ids:
            self.request_states.pop(rid, None)


async def test_a_core_request_the_front_end_forgot_is_aborted_after_the_grace():
    from pdserve.shared.roles import InstanceState
    from pdserve.worker.engine import EngineWorker
    from pdserve.worker.orphans import OrphanWatch

    worker = EngineWorker("decode-0", Role.DECODE, EngineConfig(model="/m"))
    engine = _CoreWithOrphan()
    worker._engine, worker._outbox, worker._orphans = engine, asyncio.Queue(), OrphanWatch(grace_s=0.2)
    worker._state, worker._answered_at = InstanceState.READY, time.monotonic()
    worker._tasks["live-1"] = asyncio.get_running_loop().create_future()  # a request task, still reading
    for _ in range(3):  # within the grace: an abort may be on its way, nothing is touched
        await worker.stats()
        await asyncio.sleep(0.02)
    assert engine.aborted == []
    for _ in range(20):
        await asyncio.sleep(0.05)
        if (await worker.stats()).orphans_aborted:
            break
    await asyncio.sleep(0.05)
    assert engine.aborted == ["gone-2-ef567890", "held-3-0a0b0c0d"]  # the one a task reads is left alone
    assert "held-3-0a0b0c0d" not in engine.request_states  # the front end forgot it too
    assert (await worker.stats()).orphans_aborted == 2
    worker._tasks.clear()
