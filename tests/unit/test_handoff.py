"""The P->D handoff's stream logic against fake engines and a fake reservation inbox."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from pdserve.kv_transfer.params import DecodeParams, Reservation
from pdserve.router.handoff import Handoff
from pdserve.shared.errors import EngineError
from pdserve.shared.protocol import FIRST_TOKEN_KEY, EngineRequest
from pdserve.shared.roles import Role
from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan


class Board:
    """A reservation inbox whose reservation appears at once (or never, or empty)."""

    address = "127.0.0.1:9"

    def __init__(self, available: bool = True, blocks: list[int] | None = None) -> None:
        self.available = available
        self.blocks = [0, 1] if blocks is None else blocks
        self.taken: list[str] = []

    def poll(self, transfer_id: str) -> Reservation | None:
        if not self.available:
            return None
        self.taken.append(transfer_id)
        return Reservation(transfer_id, [{"host": "x"}], self.blocks, 20)

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)


def _params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, **kwargs})


async def _run(handoff: Handoff, request: EngineRequest) -> list:
    out = []
    async with contextlib.aclosing(handoff.stream(request)) as stream:
        async for delta in stream:
            out.append(delta)
    return out


def _engines(**p_kwargs):
    fabric: dict = {}
    prefill = FakeEngineClient.make("prefill-0", Role.PREFILL, kv_fabric=fabric, **p_kwargs)
    decode = FakeEngineClient.make("decode-0", Role.DECODE, kv_fabric=fabric)
    return prefill, decode


async def test_output_equals_colocated_and_first_token_comes_from_prefill():
    prefill, decode = _engines()
    counters: dict[str, int] = {}
    request = EngineRequest("r", [5, 6, 7], _params())
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, counters), request)
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == [decode.token_at([5, 6, 7], 0, i) for i in range(6)]
    assert deltas[0].finish_reason is None and not deltas[0].request_finished  # P's token, not P's "length"
    assert deltas[-1].finish_reason == "length" and deltas[-1].request_finished
    assert prefill.submitted[0].sampling_params.max_tokens == 1
    assert prefill.submitted[0].sampling_params.extra_args["kv_transfer_params"]["decode_block_ids"] == [0, 1]
    assert decode.submitted[0].sampling_params.extra_args["kv_transfer_params"]["pd_remote_prefill"] is True
    assert counters == {"handoffs": 1}
    assert not prefill.in_flight and not decode.in_flight
    handoffs = [d.handoff_s for d in deltas if d.handoff_s is not None]
    assert len(handoffs) == 1 and handoffs[0] >= 0 and deltas[1].handoff_s is not None  # on D's first delta


async def test_sampling_keeps_the_users_seed_and_decode_continues_from_prefills_token():
    prefill, decode = _engines()
    decode.faults = FaultPlan(diverge_first_token=True)  # a sampled first token of D's own would differ
    counters: dict[str, int] = {}
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, counters),
                        EngineRequest("r", [1], _params(temperature=0.8)))
    assert prefill.submitted[0].sampling_params.seed is None  # nothing injected into the user's request
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens[0] == prefill.token_at([1], 0, 0) and len(tokens) == 6
    # D's own first token differed: it was restarted with P's token forced, and the stream went on from it.
    assert counters["first_token_restarts"] == 1
    assert decode.submitted[-1].sampling_params.extra_args[FIRST_TOKEN_KEY] == tokens[0]
    assert not prefill.in_flight and not decode.in_flight


async def test_no_reservation_runs_colocated_on_prefill():
    prefill, decode = _engines()
    decode.faults = FaultPlan(frozen=True)
    counters: dict[str, int] = {}
    deltas = await _run(Handoff(prefill, decode, Board(available=False), 0.1, 5.0, counters),
                        EngineRequest("r", [5, 6], _params()))
    assert [t for d in deltas for t in d.token_ids] == [prefill.token_at([5, 6], 0, i) for i in range(6)]
    assert counters == {"fallbacks_colocated": 1}
    assert all(d.handoff_s is None for d in deltas)
    assert not decode.in_flight and decode.aborted  # D's half was aborted


async def test_stuck_transfer_continues_on_prefill_from_its_token():
    prefill, decode = _engines()
    decode.faults = FaultPlan(frozen=True)  # reserved, then never steps (a frozen D, a stuck transfer)
    counters: dict[str, int] = {}
    started = time.monotonic()
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 0.2, counters), EngineRequest("r", [7], _params()))
    assert time.monotonic() - started < 2.0
    assert [t for d in deltas for t in d.token_ids] == [prefill.token_at([7], 0, i) for i in range(6)]
    assert counters == {"handoffs": 1, "handoff_timeouts": 1}
    assert prefill.submitted[-1].sampling_params.extra_args[FIRST_TOKEN_KEY] == deltas[0].token_ids[0]
    assert not decode.in_flight and not prefill.in_flight


async def test_dead_decode_falls_back_to_prefill_at_once():
    prefill, decode = _engines()
    decode.dead = True
    counters: dict[str, int] = {}
    started = time.monotonic()
    deltas = await _run(Handoff(prefill, decode, Board(available=False), 30.0, 5.0, counters),
                        EngineRequest("r", [5, 6], _params()))
    assert time.monotonic() - started < 2.0  # no reservation wait for a dead instance
    assert [t for d in deltas for t in d.token_ids] == [prefill.token_at([5, 6], 0, i) for i in range(6)]
    assert counters == {"fallbacks_colocated": 1}


async def test_empty_reservation_runs_on_decode_alone():
    prefill, decode = _engines()
    counters: dict[str, int] = {}
    deltas = await _run(Handoff(prefill, decode, Board(blocks=[]), 5.0, 5.0, counters),
                        EngineRequest("r", [5, 6], _params()))
    assert [t for d in deltas for t in d.token_ids] == [decode.token_at([5, 6], 0, i) for i in range(6)]
    assert not prefill.submitted and counters == {"decode_alone": 1}


async def test_prefill_failure_aborts_decode_and_runs_whole_on_decode():
    prefill, decode = _engines(faults=FaultPlan(fail_after_tokens=0))
    counters: dict[str, int] = {}
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, counters), EngineRequest("r", [9], _params()))
    assert [t for d in deltas for t in d.token_ids] == [decode.token_at([9], 0, i) for i in range(6)]
    assert counters == {"handoffs": 1, "prefill_failures": 1}
    assert "r-d" in decode.aborted  # the half that waited for P's KV was ended at once
    assert not decode.in_flight


async def test_decode_failure_after_first_token_is_a_clear_error():
    prefill, decode = _engines()
    decode.faults = FaultPlan(fail_after_tokens=2)
    with pytest.raises(EngineError):
        await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, {}), EngineRequest("r", [9], _params()))
    assert not prefill.in_flight and not decode.in_flight


async def test_stop_in_prefills_token_ends_the_request():
    prefill, decode = _engines()
    prefill.eos_after = decode.eos_after = 1
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, {}), EngineRequest("r", [9], _params(ignore_eos=False)))
    assert [d.finish_reason for d in deltas] == ["stop"] and deltas[-1].request_finished
    assert not decode.in_flight


async def test_text_held_back_for_stop_strings_is_not_sent_twice():
    prefill, decode = _engines()
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, {}), EngineRequest("r", [9], _params(stop=["zzz"])))
    first = prefill.token_at([9], 0, 0)
    assert deltas[0].text == f" w{first}"[:-2]  # two characters could start "zzz"
    assert "".join(d.text for d in deltas) == "".join(f" w{decode.token_at([9], 0, i)}" for i in range(6))


async def test_leaving_early_aborts_both():
    prefill, decode = _engines()
    decode.faults = FaultPlan(token_interval_s=0.05)
    stream = Handoff(prefill, decode, Board(), 5.0, 5.0, {}).stream(EngineRequest("r", [3], _params(max_tokens=50)))
    await stream.__anext__()  # P's token
    await stream.__anext__()  # D's second token
    await stream.aclose()
    assert not decode.in_flight and decode.aborted == ["r-d"]


async def test_n_above_one_runs_on_decode_alone():
    prefill, decode = _engines()
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, {}), EngineRequest("r", [3], _params(n=2, temperature=0.7)))
    assert not prefill.submitted and len({d.index for d in deltas}) == 2


@pytest.mark.parametrize("max_tokens", [1, 2])
async def test_short_outputs_finish_once(max_tokens):
    prefill, decode = _engines()
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, 5.0, {}), EngineRequest("r", [4], _params(max_tokens=max_tokens)))
    assert sum(len(d.token_ids) for d in deltas) == max_tokens
    assert [d.request_finished for d in deltas].count(True) == 1
