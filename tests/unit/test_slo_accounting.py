"""The live router's accounting: optimistic between polls, prompt tokens until the prefill ends, calibration."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.accounting import Ledger, Ticket, TicketState
from pdserve.router.admission import PlacementRejected
from pdserve.router.controller import Router
from pdserve.router.latency_model import LatencyModel
from pdserve.router.registry import make_policy
from pdserve.router.slo_policy import SloAware
from pdserve.router.snapshot import RequestInfo
from pdserve.shared.roles import Role
from pdserve.shared.slo import DecisionReason as R
from pdserve.shared.slo import RequestSlo
from pdserve.shared.slo_config import SloRoutingConfig
from pdserve.worker.fake_engine import FakeEngineClient


class Linear:
    def prefill_time(self, batch_tokens: int) -> float:
        return 0.001 * batch_tokens

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float:
        return 0.010 + 0.001 * batch_size


def slo_policy(**admission) -> SloAware:
    cfg = SloRoutingConfig()
    cfg.admission = cfg.admission.model_copy(update=admission)
    return SloAware(cfg, LatencyModel(Linear(), kv_bytes_per_token=0.0, handoff_latency_s=0.0))


def disaggregated(policy, prefills: int = 2, decodes: int = 2) -> Router:
    engines = [FakeEngineClient.make(f"p{i}", Role.PREFILL) for i in range(prefills)] + \
              [FakeEngineClient.make(f"d{i}", Role.DECODE) for i in range(decodes)]
    return Router(engines, policy)


def by_id(router: Router):
    return {i.instance_id: i for i in router.snapshot().instances}


def req(rid: str, prompt=64, out=64, ttft=2.0, tpot=0.05) -> RequestInfo:
    return RequestInfo(rid, prompt, out, slo=RequestSlo(ttft, tpot))


async def test_a_prompt_stops_counting_on_its_prefill_instance_at_its_first_token_not_at_the_end():
    router = disaggregated(make_policy("least_loaded"), 1, 1)
    await router.refresh()
    route = router.place(req("a", prompt=100))
    assert by_id(router)["p0"].outstanding_prefill_tokens == 100  # counted from the placement on
    with router.track(route, 100) as ticket:
        assert ticket is route.ticket and ticket.state is TicketState.RUNNING
        router.tokens(ticket, 1)  # P's token: the prefill is over
        s = by_id(router)
        assert s["p0"].outstanding_prefill_tokens == 0 and s["d0"].outstanding == 1  # D still decodes
        assert s["d0"].outstanding_context_tokens == 100 + 32
    s = by_id(router)
    assert s["d0"].outstanding == 0 and s["d0"].outstanding_context_tokens == 0


@pytest.mark.parametrize("name", ["kv_jsq", "least_loaded", "slo_aware"])
async def test_a_burst_of_50_between_two_polls_is_spread_not_herded(name):
    policy = slo_policy(mixed_fallback=False) if name == "slo_aware" else make_policy(name)
    router = disaggregated(policy)
    await router.refresh()  # the last poll: both decode instances empty; no other poll until the end
    count: dict[str, int] = {}
    for k in range(50):
        route = router.place(req(f"r{k}"))
        for iid in {route.prefill.instance_id, route.decode.instance_id}:
            count[iid] = count.get(iid, 0) + 1
    assert abs(count["d0"] - count["d1"]) <= 1 and abs(count["p0"] - count["p1"]) <= 1
    s = by_id(router)
    assert s["d0"].kv_blocks_free == 256 - 25 * 8  # 128 tokens = 8 blocks each, none seen by a poll yet
    await router.refresh()  # the poll's figures now stand for those placements (the fake reports none)
    assert by_id(router)["d0"].kv_blocks_free == 256


async def test_slo_aware_refuses_once_the_burst_fills_every_decode_instance():
    router = disaggregated(slo_policy(mixed_fallback=False))
    await router.refresh()
    for k in range(64):  # 256 blocks / 8 per request = 32 per decode instance
        router.place(req(f"r{k}", ttft=10.0))
    with pytest.raises(PlacementRejected) as err:
        router.place(req("one-more", ttft=10.0))
    assert err.value.rejection.code is R.NO_KV_ROOM


async def test_a_placement_that_never_starts_expires_and_does_not_hold_a_drain():
    router = disaggregated(make_policy("least_loaded"), 1, 1)
    router.ledger.placed_ttl_s = 0.0
    await router.refresh()
    router.place(req("gone"))
    assert by_id(router)["d0"].outstanding == 1
    assert await router.drain("d0", timeout_s=0.5)  # never started: nothing to wait for
    await asyncio.sleep(0.01)
    await router.refresh()
    assert by_id(router)["d0"].outstanding == 0


async def test_release_gives_back_a_placement_that_will_not_run():
    router = disaggregated(make_policy("least_loaded"), 1, 1)
    route = router.place(req("a"))
    router.release(route)
    s = by_id(router)
    assert s["d0"].outstanding == 0 and s["p0"].outstanding_prefill_tokens == 0


async def test_finished_requests_calibrate_the_latency_model_and_reach_the_observer():
    policy = slo_policy()
    router = disaggregated(policy, 1, 1)
    seen: list[Ticket] = []

    class Observer:
        def decided(self, request, decision):
            pass

        def finished(self, ticket):
            seen.append(ticket)

    router.observer = Observer()
    await router.refresh()
    route = router.place(req("a", prompt=10, out=4))
    assert route.ticket.placement.predicted_ttft_s == pytest.approx(0.010)
    with router.track(route, 10) as ticket:
        await asyncio.sleep(0.05)  # five times the predicted 10 ms
        router.tokens(ticket, 1)
        for _ in range(3):
            await asyncio.sleep(0.02)
            router.tokens(ticket, 1)
    assert seen == [ticket] and ticket.ttft_s >= 0.05 and ticket.tpot_s >= 0.015
    assert policy.model.factor("p0", "prefill") > 1.2  # moved toward the slower reality (weight 0.2)
    assert policy.model.factor("d0", "decode") > 1.0


def test_ledger_counts_per_instance_and_forgets_removed_ones():
    ledger = Ledger()
    for iid in ("p", "d"):
        ledger.add_instance(iid)
    t = ledger.open(Ticket("a", "p", "d", 30, 10, placed_at=1.0))
    assert ledger.load("p").prefill_tokens == 30 and ledger.load("p").pending_kv_tokens == (30,)
    assert ledger.load("d").outstanding == 1 and ledger.load("d").pending_kv_tokens == (40,)
    ledger.polled("d", 2.0)
    assert ledger.load("d").pending_kv_tokens == ()
    ledger.remove_instance("d")
    ledger.start(t)
    ledger.close(t)
    assert ledger.load("p").prefill_tokens == 0 and ledger.load("d").outstanding == 0
