"""The admission queue on scripted placement outcomes: queueing, deadlines, priority order, 429s."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.router.admission import AdmissionQueue, PlacementRejected
from pdserve.router.snapshot import Rejection, RequestInfo
from pdserve.shared.errors import CapacityError
from pdserve.shared.slo import DecisionReason as R
from pdserve.shared.slo import Priority, RequestSlo, SloRejectedError
from pdserve.shared.slo_config import SloRoutingConfig


class Cluster:
    """`attempt` places while `free` slots remain, else raises the scripted rejection; records each try."""

    def __init__(self, free: int = 0, reason: R = R.NO_KV_ROOM, retry_after_s: float = 3.2,
                 slots: tuple[float, ...] | None = None, ttft_after_s: float | None = None) -> None:
        self.free, self.reason, self.retry_after_s = free, reason, retry_after_s
        self.slots, self.ttft_after_s = slots, ttft_after_s
        self.tries: list[RequestInfo] = []
        self.placed: list[str] = []

    def attempt(self, request: RequestInfo) -> str:
        self.tries.append(request)
        if self.free <= 0:
            raise PlacementRejected(Rejection(request.request_id, f"scripted: {self.reason.value}", code=self.reason,
                                              retry_after_s=self.retry_after_s, slots_in_s=self.slots,
                                              ttft_after_s=self.ttft_after_s), request)
        self.free -= 1
        self.placed.append(request.request_id)
        return f"route-{request.request_id}"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.depths: dict[Priority, int] = {}

    def admitted(self, priority, waited_s, queued):
        self.events.append(("admitted", priority, queued))

    def rejected(self, priority, reason, waited_s):
        self.events.append(("rejected", priority, reason))

    def queue_depth(self, priority, depth):
        self.depths[priority] = depth


def queue(**admission) -> tuple[AdmissionQueue, Recorder]:
    cfg = SloRoutingConfig()
    cfg.admission = cfg.admission.model_copy(update=admission)
    rec = Recorder()
    return AdmissionQueue(cfg, rec), rec


def req(rid: str, priority=Priority.INTERACTIVE, ttft=2.0) -> RequestInfo:
    return RequestInfo(rid, 10, 10, slo=RequestSlo(ttft, 0.1, priority))


async def test_placed_at_once_when_it_fits():
    q, rec = queue()
    cluster = Cluster(free=1)
    assert await q.admit(req("a"), cluster.attempt) == "route-a"
    assert rec.events == [("admitted", Priority.INTERACTIVE, False)]


async def test_ttft_unmet_is_refused_at_once_with_retry_after_and_the_reason():
    q, rec = queue()
    started = time.monotonic()
    with pytest.raises(SloRejectedError) as err:
        await q.admit(req("a"), Cluster(reason=R.TTFT_UNMET).attempt)
    assert time.monotonic() - started < 0.05
    exc = err.value
    assert exc.status == 429 and exc.reason is R.TTFT_UNMET and exc.headers == {"Retry-After": "4"}
    assert "scripted: ttft_unmet" in exc.message and "x-slo-ttft-ms" in exc.message
    assert q.depth(Priority.INTERACTIVE) == 0 and rec.events == [("rejected", Priority.INTERACTIVE, R.TTFT_UNMET)]


async def test_no_instance_stays_a_503_and_is_not_queued():
    q, _ = queue()
    with pytest.raises(CapacityError) as err:
        await q.admit(req("a"), Cluster(reason=R.NO_INSTANCE).attempt)
    assert not isinstance(err.value, SloRejectedError) and err.value.status == 503


async def test_waits_for_room_and_is_placed_when_the_load_changes_with_its_ttft_budget_reduced():
    q, rec = queue()
    cluster = Cluster()
    task = asyncio.create_task(q.admit(req("a", ttft=2.0), cluster.attempt))
    await asyncio.sleep(0.1)
    assert not task.done() and q.depth(Priority.INTERACTIVE) == 1 and rec.depths[Priority.INTERACTIVE] == 1
    cluster.free = 1
    q.wake()
    assert await task == "route-a"
    assert cluster.tries[-1].slo.ttft_s < 1.95  # a tenth of a second waited is off its TTFT budget
    assert q.depth(Priority.INTERACTIVE) == 0 and rec.events[-1] == ("admitted", Priority.INTERACTIVE, True)


async def test_deadline_refuses_with_429_naming_the_last_reason():
    q, rec = queue(interactive_timeout_s=0.1)
    started = time.monotonic()
    with pytest.raises(SloRejectedError) as err:
        await q.admit(req("a"), Cluster(reason=R.TPOT_UNMET).attempt)
    assert 0.09 < time.monotonic() - started < 1.0
    assert err.value.reason is R.QUEUE_DEADLINE and "scripted: tpot_unmet" in err.value.message
    assert q.depth(Priority.INTERACTIVE) == 0 and rec.events[-1][2] is R.QUEUE_DEADLINE


async def test_deadline_is_capped_by_the_ttft_target():
    q, _ = queue(interactive_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(SloRejectedError):
        await q.admit(req("a", ttft=0.1), Cluster().attempt)
    assert time.monotonic() - started < 1.0


async def test_bounded_queue_refuses_the_next_at_once():
    q, _ = queue(interactive_queue=2)
    cluster = Cluster()
    waiting = [asyncio.create_task(q.admit(req(f"w{i}"), cluster.attempt)) for i in range(2)]
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(SloRejectedError) as err:
        await q.admit(req("x"), cluster.attempt)
    assert err.value.reason is R.QUEUE_FULL and "queue is full (2 requests" in err.value.message
    assert time.monotonic() - started < 0.05
    cluster.free = 2
    q.wake()
    assert await asyncio.gather(*waiting) == ["route-w0", "route-w1"]


async def test_zero_timeout_refuses_instead_of_queueing():
    q, _ = queue(batch_timeout_s=0)
    with pytest.raises(SloRejectedError) as err:
        await q.admit(req("b", Priority.BATCH, ttft=30), Cluster(reason=R.BATCH_YIELDS).attempt)
    assert err.value.reason is R.BATCH_YIELDS and err.value.priority is Priority.BATCH


async def test_batch_yields_to_interactive_and_each_class_is_fifo():
    q, _ = queue()
    cluster = Cluster()
    b1 = asyncio.create_task(q.admit(req("b1", Priority.BATCH, ttft=30), cluster.attempt))
    await asyncio.sleep(0)
    i1 = asyncio.create_task(q.admit(req("i1"), cluster.attempt))
    i2 = asyncio.create_task(q.admit(req("i2"), cluster.attempt))
    await asyncio.sleep(0)
    # a newcomer of either class queues behind the waiting interactive ones, even with room for it
    cluster.free = 1
    b2 = asyncio.create_task(q.admit(req("b2", Priority.BATCH, ttft=30), cluster.attempt))
    await asyncio.sleep(0)
    assert cluster.placed == ["i1"]  # b2's arrival woke the queue: the interactive head went first
    cluster.free = 3
    q.wake()
    await asyncio.gather(b1, i1, i2, b2)
    assert cluster.placed == ["i1", "i2", "b1", "b2"]


async def test_interactive_head_that_waits_holds_back_batch():
    q, _ = queue()
    cluster = Cluster()
    i1 = asyncio.create_task(q.admit(req("i1"), cluster.attempt))
    b1 = asyncio.create_task(q.admit(req("b1", Priority.BATCH, ttft=30), cluster.attempt))
    await asyncio.sleep(0)
    q.wake()
    assert {t.request_id for t in cluster.tries} == {"i1"}  # b1 never tried while i1 cannot fit
    cluster.free = 2
    q.wake()
    assert await i1 == "route-i1" and await b1 == "route-b1"


async def test_a_client_leaving_the_queue_is_removed():
    q, _ = queue()
    cluster = Cluster()
    task = asyncio.create_task(q.admit(req("a"), cluster.attempt))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert q.depth(Priority.INTERACTIVE) == 0


async def test_a_waiter_whose_budget_is_spent_is_refused_when_retried():
    q, _ = queue()
    cluster = Cluster()
    task = asyncio.create_task(q.admit(req("a"), cluster.attempt))
    await asyncio.sleep(0.01)
    cluster.reason = R.TTFT_UNMET  # room came, but not soon enough for its first token
    q.wake()
    with pytest.raises(SloRejectedError) as err:
        await task
    assert err.value.reason is R.TTFT_UNMET


async def test_close_refuses_everyone_waiting():
    q, _ = queue()
    task = asyncio.create_task(q.admit(req("a"), Cluster().attempt))
    await asyncio.sleep(0.01)
    q.close()
    with pytest.raises(CapacityError):
        await task


# -- the forecast: refuse at once what would only wait to be refused --------------------------------

async def test_no_forecast_slot_before_the_deadline_is_a_429_at_once_not_a_wait():
    q, rec = queue(slo_margin=0.0)
    # the 1st slot is forecast in 3 s; the request may wait 2 s (its TTFT target caps the 2 s timeout)
    with pytest.raises(SloRejectedError) as err:
        await q.admit(req("a", ttft=2.0), Cluster(reason=R.TPOT_UNMET, slots=(3.0,)).attempt)
    assert err.value.reason is R.TPOT_UNMET and err.value.headers == {"Retry-After": "3"}
    assert "forecast in 3.00 s" in err.value.message
    assert q.depth(Priority.INTERACTIVE) == 0 and rec.events == [("rejected", Priority.INTERACTIVE, R.TPOT_UNMET)]
    with pytest.raises(SloRejectedError) as err:  # nothing forecast at all: the same, at once
        await q.admit(req("b"), Cluster(reason=R.NO_KV_ROOM, slots=()).attempt)
    assert err.value.reason is R.NO_KV_ROOM and "no decode slot is forecast" in err.value.message


async def test_the_ttft_it_would_get_and_the_margin_shorten_the_wait_it_may_have():
    q, _ = queue(slo_margin=0.1)
    # 2 s target, 90 % of it usable, 1.2 s of TTFT once placed: 0.6 s left to wait; the slot is in 0.7 s
    with pytest.raises(SloRejectedError):
        await q.admit(req("a", ttft=2.0), Cluster(reason=R.TPOT_UNMET, slots=(0.7,), ttft_after_s=1.2).attempt)
    cluster = Cluster(reason=R.TPOT_UNMET, slots=(0.5,), ttft_after_s=1.2)  # in time: it waits
    task = asyncio.create_task(q.admit(req("b", ttft=2.0), cluster.attempt))
    await asyncio.sleep(0.01)
    assert q.depth(Priority.INTERACTIVE) == 1
    cluster.free = 1
    q.wake()
    assert await task == "route-b"


async def test_queue_position_picks_the_slot_and_late_waiters_are_refused_when_a_retry_finds_them_late():
    q, rec = queue(slo_margin=0.0)
    cluster = Cluster(reason=R.TPOT_UNMET, slots=(0.1, 0.2, 5.0))
    first = asyncio.create_task(q.admit(req("a"), cluster.attempt))
    second = asyncio.create_task(q.admit(req("b"), cluster.attempt))
    await asyncio.sleep(0.01)
    assert q.depth(Priority.INTERACTIVE) == 2
    with pytest.raises(SloRejectedError):  # third in line: its slot (5 s) is past its 2 s
        await q.admit(req("c"), cluster.attempt)
    cluster.slots = (0.1, 4.0)  # the forecast slips: the second waiter's slot now comes too late
    q.wake()
    with pytest.raises(SloRejectedError) as err:
        await second
    assert err.value.reason is R.TPOT_UNMET and q.depth(Priority.INTERACTIVE) == 1
    cluster.free = 1
    q.wake()
    assert await first == "route-a"
    assert [e[2] for e in rec.events if e[0] == "rejected"] == [R.TPOT_UNMET, R.TPOT_UNMET]


async def test_without_a_forecast_a_request_waits_as_before():
    q, _ = queue(interactive_timeout_s=0.05)
    with pytest.raises(SloRejectedError) as err:
        await q.admit(req("a"), Cluster(reason=R.TPOT_UNMET, slots=None).attempt)
    assert err.value.reason is R.QUEUE_DEADLINE


async def test_time_spent_before_admission_comes_off_the_ttft_budget():
    q, _ = queue(slo_margin=0.0)
    seen = []

    def attempt(request):
        seen.append(request.slo.ttft_s)
        raise PlacementRejected(Rejection(request.request_id, "scripted", code=R.TPOT_UNMET, slots_in_s=(0.5,)),
                                request)
    late = RequestInfo("a", 10, 10, arrival_time=time.monotonic() - 1.8, slo=RequestSlo(2.0, 0.1))
    with pytest.raises(SloRejectedError):  # 1.8 s of its 2 s went before the router: a 0.5 s slot is too late
        await q.admit(late, attempt)
    assert seen[0] == pytest.approx(0.2, abs=0.05)
    fresh = RequestInfo("b", 10, 10, arrival_time=time.monotonic(), slo=RequestSlo(2.0, 0.1))
    task = asyncio.create_task(q.admit(fresh, attempt))  # 0.5 s of 2 s: it waits for its slot
    await asyncio.sleep(0.01)
    assert q.depth(Priority.INTERACTIVE) == 1
    task.cancel()
