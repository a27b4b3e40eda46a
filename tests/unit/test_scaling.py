"""The live registry: planning scale changes, instances joining and draining, and the admin routes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from pdserve.gateway.app import GatewayState, create_app
from pdserve.gateway.model import ServedModel
from pdserve.gateway.server import GatewayServer
from pdserve.router.controller import Router
from pdserve.router.registry import make_policy
from pdserve.router.scaling import ScaleError, Scaler, plan_drain, plan_scale
from pdserve.shared.metrics import Metrics
from pdserve.shared.roles import InstanceState, Role
from pdserve.worker.fake_engine import FakeEngineClient

P, D, M = Role.PREFILL, Role.DECODE, Role.MIXED
MAX_LEN = 256


def test_plans_add_what_is_missing_and_remove_the_newest_first():
    current = {P: ["prefill-0"], D: ["decode-0", "decode-1", "decode-10"]}
    plan = plan_scale(current, {}, {P: 2, D: 1}, disaggregated=True)
    assert plan.add == {P: 1} and plan.remove == ("decode-10", "decode-1")
    assert plan_scale(current, {D: 1}, {D: 4}, True).add == {}  # one is on its way already
    assert plan_scale(current, {}, {}, True).to_dict() == {"add": {}, "remove": []}


@pytest.mark.parametrize("targets,starting,disaggregated,message", [
    ({P: 0}, {}, True, None),  # replacing a pool's last instance: the other runs requests whole meanwhile
    ({P: 0, D: 0}, {}, True, "at least one instance"),
    ({M: 1}, {}, False, None),
    ({P: 1, D: 1}, {}, False, "without disaggregated pools"),
    ({D: 0, P: 0, M: 1}, {}, True, None),
    ({D: 1}, {D: 2}, True, "still starting"),
])
def test_plans_the_cluster_cannot_take_are_refused_with_the_reason(targets, starting, disaggregated, message):
    current = {P: ["prefill-0"], D: ["decode-0"]} if disaggregated else {M: ["mixed-0"]}
    if message is None:
        plan_scale(current, starting, targets, disaggregated)
        return
    with pytest.raises(ScaleError, match=message):
        plan_scale(current, starting, targets, disaggregated)


class FakeFactory:
    """Starts fake engines after a delay, as Ray actors would after their engine loads."""

    def __init__(self, delay_s: float = 0.2, fail: bool = False) -> None:
        self.delay_s, self.fail = delay_s, fail
        self.next = {role: 1 for role in Role}
        self.stopped: list[str] = []

    async def start(self, role: Role) -> FakeEngineClient:
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("no GPU left")
        iid = f"{role.value}-{self.next[role]}"
        self.next[role] += 1
        return FakeEngineClient.make(iid, role, max_model_len=MAX_LEN)

    async def stop(self, client: FakeEngineClient) -> None:
        self.stopped.append(client.instance_id)


async def test_a_new_instance_gets_placements_once_it_joins_and_a_leaving_one_gets_none():
    router = Router([FakeEngineClient.make("mixed-0", M, max_model_len=MAX_LEN)], make_policy("round_robin"))
    await router.refresh()
    factory = FakeFactory()
    scaler = Scaler(router, factory, disaggregated=False, drain_timeout_s=5.0)
    plan = await scaler.scale({M: 2})
    assert plan.add == {M: 1} and scaler.starting == {M: 1}
    assert set(router.clients) == {"mixed-0"}  # not placed on before its engine is up
    await asyncio.sleep(0.4)
    assert set(router.clients) == {"mixed-0", "mixed-1"} and scaler.starting == {M: 0}
    await router.refresh()
    from pdserve.router.policy import RequestInfo

    placed = {router.place(RequestInfo(f"r{i}", 10, 10)).decode.instance_id for i in range(4)}
    assert placed == {"mixed-0", "mixed-1"}
    # Scale down while a request runs on the leaving instance: it finishes, then the instance goes.
    leaving = router.clients["mixed-1"]
    route = type("R", (), {"decode": leaving, "prefill": leaving})()
    with router.track(route, 10):
        await scaler.scale({M: 1})
        assert router.latest_stats()[1].state is InstanceState.DRAINING
        assert {router.place(RequestInfo(f"s{i}", 10, 10)).decode.instance_id for i in range(4)} == {"mixed-0"}
        await asyncio.sleep(0.3)
        assert "mixed-1" in router.clients  # still draining: its request runs
    await asyncio.sleep(0.3)
    assert set(router.clients) == {"mixed-0"} and factory.stopped == ["mixed-1"]
    assert scaler.counters == {"started": 1, "start_failures": 0, "removed": 1, "drain_timeouts": 0}
    await scaler.close()


async def test_an_instance_that_fails_to_start_never_joins_and_is_counted():
    router = Router([FakeEngineClient.make("mixed-0", M, max_model_len=MAX_LEN)], make_policy("round_robin"))
    scaler = Scaler(router, FakeFactory(delay_s=0.0, fail=True), disaggregated=False)
    await scaler.scale({M: 3})
    await asyncio.sleep(0.1)
    assert set(router.clients) == {"mixed-0"} and scaler.counters["start_failures"] == 2
    assert scaler.starting == {M: 0}


class Inbox:
    """A reservation inbox whose reservation is there at once (the fake engines move no real KV)."""

    address = "127.0.0.1:9"

    def poll(self, transfer_id: str):
        from pdserve.kv_transfer.params import Reservation

        return Reservation(transfer_id, [{}], [0], 1)

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)


@pytest.fixture()
def admin_gateway(demo_model_dir):
    model = ServedModel.load("demo", str(demo_model_dir), MAX_LEN)
    fabric: dict = {}
    engines = [FakeEngineClient.make(iid, role, max_model_len=MAX_LEN, detokenize=model.decode, kv_fabric=fabric)
               for iid, role in (("prefill-0", P), ("decode-0", D))]
    router = Router(engines, make_policy("least_loaded"), inbox=Inbox())
    scaler = Scaler(router, FakeFactory(), disaggregated=True, drain_timeout_s=5.0)
    app = create_app(GatewayState(model, router, Metrics("demo"), api_key="k", stats_interval_s=0.05,
                                  scaler=scaler))
    server = GatewayServer(app, "127.0.0.1", 0, log_level="warning")
    url = server.start_in_thread()
    yield url, router
    server.stop()


def test_the_admin_routes_scale_a_running_gateway_and_guard_it_with_the_key(admin_gateway):
    url, router = admin_gateway
    auth = {"Authorization": "Bearer k"}
    assert httpx.get(f"{url}/admin/instances").status_code == 401
    answer = httpx.post(f"{url}/admin/scale", json={"decode": 2}, headers=auth)
    assert answer.status_code == 202 and answer.json()["plan"] == {"add": {"decode": 1}, "remove": []}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "decode-1" not in router.clients:
        time.sleep(0.05)
    listed = httpx.get(f"{url}/admin/instances", headers=auth).json()
    assert {i["instance_id"] for i in listed["instances"]} == {"prefill-0", "decode-0", "decode-1"}
    # Requests keep being served through the change.
    done = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, headers=auth, timeout=10)
    assert done.status_code == 200, done.text
    for body, message in (({"decode": -1}, "greater than or equal to 0"), ({"prefill": 0, "decode": 0}, "at least one instance"),
                          ({"gpus": 2}, "Extra inputs")):
        refused = httpx.post(f"{url}/admin/scale", json=body, headers=auth)
        assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text


def test_plan_drain_removes_exactly_the_named_instances_and_can_replace_them():
    current = {P: ["prefill-0", "prefill-1"], D: ["decode-0", "decode-3"]}
    plan = plan_drain(current, {}, ["decode-0", "prefill-1", "decode-0"], replace=False)
    assert plan.remove == ("decode-0", "prefill-1") and plan.add == {}  # not the newest: the named ones
    replaced = plan_drain(current, {}, ["decode-0", "prefill-1"], replace=True)
    assert replaced.add == {D: 1, P: 1}
    every = ["prefill-0", "prefill-1", "decode-0", "decode-3"]
    assert plan_drain(current, {}, every, replace=True).add == {P: 2, D: 2}  # replaced: none is lost
    for ids, message in ((["decode-9"], "decode-9"), ([], "at least one instance"), (every, "must remain")):
        with pytest.raises(ScaleError, match=message):
            plan_drain(current, {}, ids, replace=False)


def test_the_drain_route_drains_the_named_instance_while_requests_are_served(admin_gateway):
    url, router = admin_gateway
    auth = {"Authorization": "Bearer k"}
    assert httpx.post(f"{url}/admin/drain", json={"instances": ["decode-0"]}).status_code == 401
    answer = httpx.post(f"{url}/admin/drain", json={"instances": ["decode-0"], "replace": True}, headers=auth)
    assert answer.status_code == 202, answer.text
    assert answer.json()["plan"] == {"add": {"decode": 1}, "remove": ["decode-0"]}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ("decode-0" in router.clients or "decode-1" not in router.clients):
        time.sleep(0.05)
    assert set(router.clients) == {"prefill-0", "decode-1"}
    done = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, headers=auth, timeout=10)
    assert done.status_code == 200, done.text
    scraped = httpx.get(f"{url}/metrics").text  # the scaler's counters are on /metrics too
    assert 'pdserve:scaling_events{event="started",model_name="demo"} 1.0' in scraped
    assert 'pdserve:scaling_events{event="removed",model_name="demo"} 1.0' in scraped
    for body, message in (({"instances": ["decode-0"]}, "not a serving instance"),
                          ({"instances": []}, "at least 1"), ({"instances": ["decode-1"], "now": 1}, "Extra inputs")):
        refused = httpx.post(f"{url}/admin/drain", json=body, headers=auth)
        assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text


async def test_a_ray_instance_that_is_never_placed_is_killed_at_the_start_deadline(monkeypatch):
    """An actor whose resources no node has waits in Ray's queue for ever: the factory gives up on it."""
    import ray

    from pdserve.shared.config import EngineConfig, PoolsConfig
    from pdserve.shared.errors import EngineError
    from pdserve.worker.pool import RayInstanceFactory

    class Pending:
        class start:
            @staticmethod
            def remote():
                return asyncio.get_running_loop().create_future()  # never resolved: no node fits

    killed: list = []
    monkeypatch.setattr(ray, "kill", killed.append)
    factory = RayInstanceFactory(EngineConfig(), PoolsConfig(mixed=1, prefill=0, decode=0, start_timeout_s=0.2))
    actor = Pending()
    monkeypatch.setattr(factory, "make_actor", lambda iid, role: actor)
    with pytest.raises(EngineError, match="start_timeout_s"):
        await factory.start(M)
    assert killed == [actor] and not factory.live
