"""Resumable streams (router.resume) against fake engines: the seam's arithmetic, stop strings across it,
usage, no token lost or repeated, the limits, and the move() API migration uses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from pdserve.kv_transfer.params import Reservation
from pdserve.router.handoff import Handoff
from pdserve.router.resume import MoveAborted, StreamRecovery, choose_target
from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot
from pdserve.shared.config import StreamResumeConfig
from pdserve.shared.errors import EngineDeadError, EngineError
from pdserve.shared.protocol import EngineRequest
from pdserve.shared.roles import Role
from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan

PROMPT = [5, 6, 7]


class LM(FakeEngineClient):
    """A fake whose next token depends on the whole sequence (as a real model's does), so that a
    continuation on prompt + generated gives the tokens an unbroken run gives. Like vLLM, it finds
    stop strings only in text it produced itself."""

    def token_at(self, prompt: list[int], choice: int, position: int) -> int:
        seq = list(prompt)
        for _ in range(position + 1):
            seq.append(10 + (seq[-1] * 31 + len(seq) * 7) % (self.vocab_size - 10))
        return seq[-1]

    async def generate(self, request: EngineRequest):
        params = request.sampling_params
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        text, produced = "", 0
        async with contextlib.aclosing(super().generate(request)) as stream:
            async for delta in stream:
                produced += len(delta.token_ids)
                start = len(text)
                text += delta.text
                hit = None
                if stops and produced > params.min_tokens and delta.finish_reason is None:
                    found = [(text.find(s, max(start - len(s) + 1, 0)), s) for s in stops]
                    found = [(at + len(s), at, s) for at, s in found if at != -1]
                    hit = min(found) if found else None
                if hit is None:
                    yield delta
                    continue
                stop_end, at, stop = hit
                end = stop_end if params.include_stop_str_in_output else at
                yield dataclasses.replace(delta, text=text[start:end] if end > start else "", finish_reason="stop",
                                          stop_reason=stop, request_finished=True)
                return


def _lm(iid: str, role: Role = Role.DECODE, **faults) -> LM:
    info = FakeEngineClient.make(iid, role).info
    return LM(info=info, faults=FaultPlan(**faults))


def _params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": 10, "temperature": 0.0, "ignore_eos": True, **kwargs})


def _picker(*clients):
    def pick(exclude: set[str], prompt_tokens: int):
        return next((c for c in clients if c.instance_id not in exclude and not c.dead), None)
    return pick


async def _run(recovery: StreamRecovery, source, request: EngineRequest, *others) -> list:
    stream = recovery.wrap(request, source.generate, lambda: (source.instance_id, request.request_id),
                           _picker(*others))
    async with contextlib.aclosing(stream) as deltas:
        return [d async for d in deltas]


def _tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def _text(deltas) -> str:
    return "".join(d.text for d in deltas)


async def _reference(params, prompt=PROMPT) -> list:
    return await _run(StreamRecovery(), _lm("ref"), EngineRequest("ref", prompt, params))


async def test_dead_instance_resumes_on_another_with_no_token_lost_or_repeated():
    params = _params(max_tokens=10, min_tokens=8, logprobs=1)
    expected = await _reference(params)
    dying, healthy, recovery = _lm("d0", die_after_tokens=4), _lm("d1"), StreamRecovery()
    deltas = await _run(recovery, dying, EngineRequest("r", PROMPT, params), healthy)
    assert _tokens(deltas) == _tokens(expected) and len(_tokens(deltas)) == 10
    assert _text(deltas) == _text(expected)
    assert sum(len(d.logprobs) for d in deltas) == 10
    assert deltas[-1].finish_reason == "length" and deltas[-1].request_finished
    assert sum(d.finish_reason is not None for d in deltas) == 1
    # The continuation: prompt + the 4 tokens sent, 6 more to make, min_tokens less the 4 too.
    cont = healthy.submitted[0]
    assert cont.prompt_token_ids == PROMPT + _tokens(expected)[:4] and cont.request_id == "r-r1"
    assert cont.sampling_params.max_tokens == 6 and cont.sampling_params.min_tokens == 4
    assert cont.sampling_params.logprobs == 1 and cont.sampling_params.prompt_logprobs is None
    assert params.max_tokens == 10 and params.min_tokens == 8  # the user's params are not touched
    assert all(d.num_prompt_tokens == len(PROMPT) for d in deltas)  # usage counts the original prompt
    assert recovery.counters == {"resumed": 1, "completed": 1}
    assert len(recovery.streams) == 0 and not healthy.in_flight


async def test_death_before_any_token_retries_whole():
    params = _params(max_tokens=5)
    dying, healthy, recovery = _lm("d0", die_after_tokens=0), _lm("d1"), StreamRecovery()
    deltas = await _run(recovery, dying, EngineRequest("r", PROMPT, params), healthy)
    assert _tokens(deltas) == _tokens(await _reference(params))
    assert healthy.submitted[0].prompt_token_ids == PROMPT


@pytest.mark.parametrize("include", [False, True])
async def test_a_stop_string_across_the_seam_is_found(include):
    plain = await _reference(_params(max_tokens=10))
    tokens = _tokens(plain)
    words = [d.text for d in plain]  # " w<id>" per token
    stop = words[3][-2:] + words[4][:3]  # ends the 4th token's text, begins the 5th's: across a seam after 4
    params = _params(max_tokens=10, stop=[stop, "never-seen"], include_stop_str_in_output=include)
    expected = await _reference(params)  # one engine finds it itself
    assert _tokens(expected) == tokens[:5] and expected[-1].stop_reason == stop
    dying, healthy = _lm("d0", die_after_tokens=4), _lm("d1")
    deltas = await _run(StreamRecovery(), dying, EngineRequest("r", PROMPT, params), healthy)
    assert _tokens(deltas) == tokens[:5]
    assert _text(deltas) == _text(expected) == "".join(words[:4])[:-2] + (stop if include else "")
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop and deltas[-1].request_finished
    assert not healthy.in_flight  # the continuation never saw the stop string: it was ended
    if not include:
        # Held back: no delta showed the stop string's first characters before it was complete.
        assert stop[:2] not in _text(deltas)


async def test_min_tokens_suppresses_a_stop_string_across_the_seam():
    plain = await _reference(_params(max_tokens=8))
    words = [d.text for d in plain]
    stop = words[3][-2:] + words[4][:3]
    params = _params(max_tokens=8, min_tokens=6, stop=[stop])
    dying, healthy = _lm("d0", die_after_tokens=4), _lm("d1")
    deltas = await _run(StreamRecovery(), dying, EngineRequest("r", PROMPT, params), healthy)
    assert _tokens(deltas) == _tokens(plain) and deltas[-1].finish_reason == "length"
    assert _text(deltas) == _text(plain)


async def test_stop_strings_without_a_failure_are_held_back_and_cut_as_vllm_does():
    plain = await _reference(_params(max_tokens=10))
    words = [d.text for d in plain]
    stop = words[6][1:4]
    deltas = await _reference(_params(max_tokens=10, stop=[stop]))
    assert _text(deltas) == "".join(words[:6]) + words[6][:1]
    assert deltas[-1].stop_reason == stop and len(_tokens(deltas)) == 7


async def test_resumes_are_bounded_and_each_instance_is_tried_once():
    params = _params(max_tokens=10)
    recovery = StreamRecovery(StreamResumeConfig(max_resumes=1))
    a, b, c = _lm("a", die_after_tokens=2), _lm("b", die_after_tokens=1), _lm("c")
    with pytest.raises(EngineDeadError, match="no more recoveries"):
        await _run(recovery, a, EngineRequest("r", PROMPT, params), b, c)
    assert not c.submitted and recovery.counters == {"resumed": 1, "limit": 1}
    assert len(recovery.streams) == 0


async def test_no_instance_left_ends_the_stream_with_the_error():
    recovery = StreamRecovery()
    with pytest.raises(EngineDeadError, match="no healthy instance"):
        await _run(recovery, _lm("a", die_after_tokens=3), EngineRequest("r", PROMPT, _params()))
    assert recovery.counters == {"no_instance": 1}


async def test_disabled_recovery_ends_the_stream_at_once():
    recovery = StreamRecovery(StreamResumeConfig(enabled=False))
    other = _lm("b")
    with pytest.raises(EngineDeadError):
        await _run(recovery, _lm("a", die_after_tokens=3), EngineRequest("r", PROMPT, _params()), other)
    assert not other.submitted


async def test_a_silent_continuation_times_out_and_the_next_instance_takes_it():
    params = _params(max_tokens=6)
    recovery = StreamRecovery(StreamResumeConfig(timeout_s=0.2))
    frozen, good = _lm("b", frozen=True), _lm("c")
    deltas = await _run(recovery, _lm("a", die_after_tokens=2), EngineRequest("r", PROMPT, params), frozen, good)
    assert _tokens(deltas) == _tokens(await _reference(params))
    assert recovery.counters == {"timeout": 1, "resumed": 1, "completed": 1}
    assert not frozen.in_flight and frozen.aborted == ["r-r1"]


async def test_an_engine_error_that_is_not_a_death_is_not_resumed():
    other = _lm("b")
    with pytest.raises(EngineError, match="injected"):
        await _run(StreamRecovery(), _lm("a", fail_after_tokens=2), EngineRequest("r", PROMPT, _params()), other)
    assert not other.submitted


async def test_n_greater_than_one_passes_through_unregistered():
    recovery = StreamRecovery()
    deltas = await _run(recovery, _lm("a"), EngineRequest("r", PROMPT, _params(n=2, max_tokens=3, temperature=0.8)))
    assert {d.index for d in deltas} == {0, 1} and recovery.counters == {}


def test_choose_target_prefers_healthy_decode_with_room_then_least_loaded():
    def inst(iid, role, **kw):
        return InstanceSnapshot(iid, role, kv_blocks_total=100, kv_blocks_free=kw.pop("free", 100), **kw)

    snap = ClusterSnapshot((inst("p", Role.PREFILL), inst("d0", Role.DECODE, outstanding=3),
                            inst("d1", Role.DECODE, outstanding=1), inst("d2", Role.DECODE, healthy=False),
                            inst("d3", Role.DECODE, free=1)), now=0.0)
    assert choose_target(snap, set(), 100) == "d1"
    assert choose_target(snap, {"d1"}, 100) == "d0"
    assert choose_target(snap, {"d0", "d1"}, 100) == "p"  # d3 has no room for the prompt: P can run it whole
    assert choose_target(snap, {"d0", "d1", "p"}, 100) == "d3"
    assert choose_target(snap, {"d0", "d1", "p", "d3"}, 100) is None


class Board:
    address = "127.0.0.1:9"

    def poll(self, transfer_id: str) -> Reservation:
        return Reservation(transfer_id, [{"host": "x"}], [0, 1], 20)

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)


async def test_a_dead_decode_after_the_handoff_resumes_on_another_decode():
    fabric: dict = {}
    prefill = LM(info=FakeEngineClient.make("p", Role.PREFILL).info, kv_fabric=fabric)
    decode = LM(info=FakeEngineClient.make("d0", Role.DECODE).info, kv_fabric=fabric,
                faults=FaultPlan(die_after_tokens=4))
    spare = _lm("d1")
    params, recovery = _params(max_tokens=9), StreamRecovery()
    handoff = Handoff(prefill, decode, Board(), 5.0, 5.0, {})
    request = EngineRequest("r", PROMPT, params)
    async with contextlib.aclosing(recovery.wrap(request, handoff.stream, handoff.where,
                                                 _picker(spare, prefill))) as stream:
        deltas = [d async for d in stream]
    assert _tokens(deltas) == _tokens(await _reference(params))
    # D's 4 tokens were P's (dropped) and 3 of its own: the client had 4 when D died.
    assert spare.submitted[0].prompt_token_ids == PROMPT + _tokens(deltas)[:4]
    assert recovery.counters == {"resumed": 1, "completed": 1}
    assert not decode.in_flight and not prefill.in_flight and not spare.in_flight


async def _stream_with(recovery, source, request, on_delta):
    stream = recovery.wrap(request, source.generate, lambda: (source.instance_id, request.request_id), _picker())
    out = []
    async with contextlib.aclosing(stream) as deltas:
        async for d in deltas:
            out.append(d)
            await on_delta(out)
    return out


async def test_move_switches_at_a_token_boundary_and_the_stream_goes_on():
    params = _params(max_tokens=12, logprobs=0)
    source, target, recovery = _lm("a", token_interval_s=0.01), _lm("b"), StreamRecovery()
    seams, moved = [], []

    async def prepare(seam):
        seams.append(seam)
        params2 = seam.request.sampling_params.clone()
        params2.extra_args = {**(params2.extra_args or {}), "kv_transfer_params": {"migrated": True}}
        return dataclasses.replace(seam.request, sampling_params=params2)

    async def on_delta(out):
        if len(out) == 3 and not moved:
            live = recovery.streams.get("r")
            assert live is not None and live.instance_id == "a" and live.engine_request_id == "r"
            moved.append(asyncio.ensure_future(live.move(target, prepare, at_tokens=5)))

    deltas = await _stream_with(recovery, source, EngineRequest("r", PROMPT, params), on_delta)
    seam = await moved[0]
    assert _tokens(deltas) == _tokens(await _reference(params))
    assert seam is seams[0] and len(seam.generated) == 5 and seam.source == "a" and seam.target == "b"
    cont = target.submitted[0]
    assert cont.prompt_token_ids == PROMPT + list(seam.generated) and cont.sampling_params.max_tokens == 7
    assert cont.sampling_params.extra_args["kv_transfer_params"] == {"migrated": True}
    assert source.aborted == ["r"] and not source.in_flight and not target.in_flight
    assert recovery.moves == {"moved": 1} and recovery.counters == {}


@pytest.mark.parametrize("refusal", ["raise", "none"])
async def test_a_move_refused_by_prepare_keeps_the_stream_on_its_source(refusal):
    params = _params(max_tokens=8)
    source, target, recovery = _lm("a", token_interval_s=0.01), _lm("b"), StreamRecovery()
    results = []

    async def refuse(seam):
        if refusal == "raise":
            raise RuntimeError("target has no room")
        return None

    async def on_delta(out):
        if len(out) == 2:
            results.append(asyncio.ensure_future(recovery.streams.get("r").move(target, refuse)))

    deltas = await _stream_with(recovery, source, EngineRequest("r", PROMPT, params), on_delta)
    with pytest.raises(MoveAborted, match="no room" if refusal == "raise" else "called the move off") as info:
        await results[0]
    assert info.value.stage == "prepare" and recovery.moves == {"aborted_prepare": 1}
    assert _tokens(deltas) == _tokens(await _reference(params)) and not target.submitted and not source.aborted
    assert recovery.streams.get("r") is None


async def test_moves_are_refused_when_finished_or_already_pending_and_time_out_without_a_boundary():
    params = _params(max_tokens=4)
    source, target, recovery = _lm("a", frozen=True), _lm("b"), StreamRecovery()
    request = EngineRequest("r", PROMPT, params)
    stream = recovery.wrap(request, source.generate, lambda: ("a", "r"), _picker())
    consumer = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    live = recovery.streams.get("r")
    # A boundary that never comes (the source is silent and at_tokens is ahead): the move times out.
    with pytest.raises(MoveAborted) as info:
        await live.move(target, at_tokens=2, timeout_s=0.1)
    assert info.value.stage == "timeout" and not live.moving
    pending = asyncio.ensure_future(live.move(target, at_tokens=2, timeout_s=5))
    await asyncio.sleep(0)
    with pytest.raises(MoveAborted, match="pending"):
        await live.move(target)
    consumer.cancel()
    with contextlib.suppress(BaseException):
        await consumer
    await stream.aclose()
    with pytest.raises(MoveAborted):
        await pending  # the stream ended under it
    assert recovery.streams.get("r") is None and not source.in_flight


def test_through_the_gateway_usage_is_the_whole_request_after_a_recovery(demo_model_dir):
    import json

    import httpx

    from pdserve.gateway.app import GatewayState, create_app
    from pdserve.gateway.model import ServedModel
    from pdserve.gateway.server import GatewayServer
    from pdserve.router.controller import Router
    from pdserve.router.registry import make_policy
    from pdserve.shared.metrics import Metrics

    model = ServedModel.load("demo", str(demo_model_dir), 256)
    dying = LM(info=FakeEngineClient.make("m0", Role.MIXED, 256).info, detokenize=model.decode,
               faults=FaultPlan(die_after_tokens=3, restart_fails=True))
    healthy = LM(info=FakeEngineClient.make("m1", Role.MIXED, 256).info, detokenize=model.decode)
    router = Router([dying, healthy], make_policy("round_robin"))
    metrics = Metrics("demo")
    server = GatewayServer(create_app(GatewayState(model, router, metrics, stats_interval_s=0.05)),
                           "127.0.0.1", 0, log_level="warning")
    url = server.start_in_thread()
    router._restart_backoff_s = 60.0
    try:
        body = {"model": "demo", "prompt": PROMPT, "max_tokens": 9, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), chunks
        usage = chunks[-1]["usage"]
        assert usage["prompt_tokens"] == len(PROMPT) and usage["completion_tokens"] == 9
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        expected = [healthy.token_at(PROMPT, 0, i) for i in range(9)]
        assert text == "".join(model.decode([t]) for t in expected)
        assert healthy.submitted[-1].prompt_token_ids == PROMPT + expected[:3]
        scrape = httpx.get(url + "/metrics").text
        assert 'pdserve:stream_recoveries_total{model_name="demo",outcome="completed"} 1.0' in scrape
    finally:
        server.stop()


async def test_a_source_stopped_under_the_stream_waits_for_the_move_not_the_end():
    """Migration stops the request on the source (vLLM ends it with finish_reason "abort"): the client's
    stream neither ends nor fails; the move continues it on the target."""
    params = _params(max_tokens=8)
    expected = _tokens(await _reference(params))
    target, recovery = _lm("b"), StreamRecovery()
    stopped = asyncio.Event()

    async def source(request):
        ref = _lm("a")
        async with contextlib.aclosing(ref.generate(request)) as stream:
            async for delta in stream:
                if len(ref.submitted) and delta.token_ids and delta.token_ids[0] == expected[3]:
                    yield dataclasses.replace(delta, finish_reason="abort", request_finished=True)
                    stopped.set()
                    return
                yield delta

    request = EngineRequest("r", PROMPT, params)
    stream = recovery.wrap(request, source, lambda: ("a", "r"), _picker())
    moves = []

    async def mover():
        await stopped.wait()
        moves.append(await recovery.streams.get("r").move(target, at_tokens=4))

    task = asyncio.ensure_future(mover())
    async with contextlib.aclosing(stream) as deltas:
        out = [d async for d in deltas]
    await task
    assert _tokens(out) == expected and len(moves[0].generated) == 4
    assert [d.finish_reason for d in out].count("abort") == 0 and out[-1].finish_reason == "length"


async def test_a_source_stopped_and_never_moved_recovers_at_the_deadline():
    params = _params(max_tokens=6)
    expected = _tokens(await _reference(params))
    spare, recovery = _lm("b"), StreamRecovery(StreamResumeConfig(timeout_s=0.2))

    async def source(request):
        async with contextlib.aclosing(_lm("a").generate(request)) as stream:
            async for delta in stream:
                yield dataclasses.replace(delta, finish_reason="abort", request_finished=True)
                return

    request = EngineRequest("r", PROMPT, params)
    async with contextlib.aclosing(recovery.wrap(request, source, lambda: ("a", "r"), _picker(spare))) as s:
        out = [d async for d in s]
    assert _tokens(out) == expected and spare.submitted[0].prompt_token_ids == PROMPT + expected[:1]
    assert recovery.counters == {"timeout": 1, "resumed": 1, "completed": 1}
