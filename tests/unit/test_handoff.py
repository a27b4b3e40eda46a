"""The P->D handoff's stream logic against fake engines and a fake reservation board."""

from __future__ import annotations

import contextlib

import pytest

from pdserve.kv_transfer.connector_meta import Reservation
from pdserve.kv_transfer.errors import TransferTimeout
from pdserve.router.handoff import Handoff
from pdserve.shared.protocol import EngineRequest
from pdserve.shared.roles import Role
from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan


class Board:
    def __init__(self, available: bool = True) -> None:
        self.available = available
        self.taken: list[str] = []

    def post(self, reservation: Reservation) -> None:  # pragma: no cover - D posts, not the test
        raise NotImplementedError

    def take(self, transfer_id: str, timeout_s: float) -> Reservation:
        if not self.available:
            raise TransferTimeout(f"no reservation for {transfer_id}")
        self.taken.append(transfer_id)
        return Reservation(transfer_id, {"host": "x"}, [0, 1], 20)


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
    prefill = FakeEngineClient.make("prefill-0", Role.PREFILL, **p_kwargs)
    decode = FakeEngineClient.make("decode-0", Role.DECODE)
    return prefill, decode


async def test_output_equals_colocated_and_first_token_comes_from_prefill():
    prefill, decode = _engines()
    counters: dict[str, int] = {}
    request = EngineRequest("r", [5, 6, 7], _params())
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, counters), request)
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


async def test_sampling_gets_one_seed_for_both_instances():
    prefill, decode = _engines()
    await _run(Handoff(prefill, decode, Board(), 5.0, {}), EngineRequest("r", [1], _params(temperature=0.8)))
    seeds = {prefill.submitted[0].sampling_params.seed, decode.submitted[0].sampling_params.seed}
    assert len(seeds) == 1 and None not in seeds


async def test_no_reservation_runs_colocated_on_prefill():
    prefill, decode = _engines()
    counters: dict[str, int] = {}
    deltas = await _run(Handoff(prefill, decode, Board(available=False), 0.1, counters),
                        EngineRequest("r", [5, 6], _params()))
    assert [t for d in deltas for t in d.token_ids] == [prefill.token_at([5, 6], 0, i) for i in range(6)]
    assert counters == {"fallbacks_colocated": 1}
    assert all(d.handoff_s is None for d in deltas)
    assert not decode.in_flight and decode.aborted  # D's half was aborted


async def test_prefill_failure_keeps_decode_first_token():
    prefill, decode = _engines(faults=FaultPlan(fail_after_tokens=0))
    counters: dict[str, int] = {}
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, counters), EngineRequest("r", [9], _params()))
    assert [t for d in deltas for t in d.token_ids] == [decode.token_at([9], 0, i) for i in range(6)]
    assert counters == {"handoffs": 1, "prefill_failures": 1}


async def test_leaving_early_aborts_both():
    prefill, decode = _engines()
    decode.faults = FaultPlan(token_interval_s=0.05)
    stream = Handoff(prefill, decode, Board(), 5.0, {}).stream(EngineRequest("r", [3], _params(max_tokens=50)))
    await stream.__anext__()  # P's token
    await stream.__anext__()  # D's second token
    await stream.aclose()
    assert not decode.in_flight and decode.aborted == ["r-d"]


async def test_n_above_one_runs_on_decode_alone():
    prefill, decode = _engines()
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, {}), EngineRequest("r", [3], _params(n=2, temperature=0.7)))
    assert not prefill.submitted and len({d.index for d in deltas}) == 2


@pytest.mark.parametrize("max_tokens", [1, 2])
async def test_short_outputs_finish_once(max_tokens):
    prefill, decode = _engines()
    deltas = await _run(Handoff(prefill, decode, Board(), 5.0, {}), EngineRequest("r", [4], _params(max_tokens=max_tokens)))
    assert sum(len(d.token_ids) for d in deltas) == max_tokens
    assert [d.request_finished for d in deltas].count(True) == 1
