"""The migration coordinator (router.migration) against fake engines: the state machine, every abort path,
no block held on either side after it, the client's tokens equal to an unmigrated run's."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from pdserve.kv_transfer.params import Reservation
from pdserve.router.migration import CoordinatorConfig, MigrationCoordinator, MigrationOutcome, MigrationStage
from pdserve.router.migration_policy import MigrationReason
from pdserve.router.resume import StreamRecovery
from pdserve.shared.protocol import EngineRequest
from pdserve.shared.roles import Role
from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan
from pdserve.worker.migration import GENERATOR_STEPS_KEY, FakeMigratable

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 40


class Inbox:
    """The router's reservation inbox, answered by the fake targets: blocks for every transfer they got."""

    address = "127.0.0.1:1"

    def __init__(self, *targets: FakeMigratable) -> None:
        self.targets = targets
        self.silent: set[str] = set()  # instances that never post (refused, stuck)
        self.empty: set[str] = set()  # instances that post "no transfer"

    def poll(self, transfer_id: str) -> Reservation | None:
        for target in self.targets:
            for request in target.submitted:
                kv = (request.sampling_params.extra_args or {}).get("kv_transfer_params") or {}
                if kv.get("transfer_id") != transfer_id or target.instance_id in self.silent:
                    continue
                if target.instance_id in self.empty:
                    return Reservation(transfer_id)
                tokens = len(request.prompt_token_ids) - 1
                return Reservation(transfer_id, [{"instance_id": target.instance_id}], list(range(-(-tokens // 16))),
                                   tokens)
        return None

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        await asyncio.sleep(min(timeout_s, 0.005))


def _engines(n: int = 2, interval: float = 0.004) -> list[FakeMigratable]:
    fabric: dict = {}
    out = []
    for i in range(n):
        info = FakeEngineClient.make(f"d{i}", Role.DECODE).info
        out.append(FakeMigratable(info=info, kv_fabric=fabric, faults=FaultPlan(token_interval_s=interval)))
    return out


def _params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, **kwargs})


def _expected(engine: FakeEngineClient, max_tokens: int = MAX_TOKENS) -> list[int]:
    return [engine.token_at(PROMPT, 0, i) for i in range(max_tokens)]


class Harness:
    def __init__(self, engines: list[FakeMigratable], config: CoordinatorConfig | None = None) -> None:
        self.engines = {e.instance_id: e for e in engines}
        self.recovery = StreamRecovery()
        self.inbox = Inbox(*engines)
        self.coordinator = MigrationCoordinator(self.recovery.streams, self.engines, self.inbox,
                                                config or CoordinatorConfig(reservation_timeout_s=0.3,
                                                                            transfer_timeout_s=0.3))

    def pick(self, exclude: set[str], prompt_tokens: int):
        return next((e for e in self.engines.values() if e.instance_id not in exclude and not e.dead), None)

    async def run(self, request: EngineRequest, on_token) -> list[int]:
        source = self.engines["d0"]
        tokens: list[int] = []
        stream = self.recovery.wrap(request, source.generate, lambda: (source.instance_id, request.request_id),
                                    self.pick)
        async with contextlib.aclosing(stream) as deltas:
            async for delta in deltas:
                tokens.extend(delta.token_ids)
                await on_token(len(tokens))
        return tokens

    def held(self) -> int:
        return sum(len(e.held) for e in self.engines.values())


def _request(rid: str = "r1", **params) -> EngineRequest:
    return EngineRequest(rid, list(PROMPT), _params(**params))


@pytest.mark.parametrize("moves", [1, 2, 5])
async def test_migrated_stream_equals_the_unmigrated_one(moves: int) -> None:
    h = Harness(_engines(2))
    at = {5 * (k + 1): f"d{(k + 1) % 2}" for k in range(moves)}  # after 5, 10, ... tokens, alternately
    tasks = []

    async def on_token(count: int) -> None:
        if count in at:
            tasks.append(asyncio.create_task(h.coordinator.migrate("r1", at.pop(count))))
            await asyncio.sleep(0)

    tokens = await h.run(_request(), on_token)
    results = await asyncio.gather(*tasks)
    assert tokens == _expected(h.engines["d0"])
    assert [r.outcome for r in results] == [MigrationOutcome.COMPLETED] * moves
    assert all(r.stage is MigrationStage.DONE and r.downtime_s is not None and r.stages == 1 for r in results)
    assert h.held() == 0 and not h.coordinator.in_flight
    # each continuation says how many tokens came before it (the target's generator skips them)
    starts = [r.sampling_params.extra_args[GENERATOR_STEPS_KEY] for e in h.engines.values() for r in e.submitted
              if GENERATOR_STEPS_KEY in (r.sampling_params.extra_args or {})]
    assert sorted(starts) == [r.tokens for r in results]
    assert all(r.sampling_params.max_tokens == MAX_TOKENS - s for e in h.engines.values() for r in e.submitted
               for s in [(r.sampling_params.extra_args or {}).get(GENERATOR_STEPS_KEY, 0)])


async def _one_migration(h: Harness, target: str = "d1", at_count: int = 5):
    tasks = []

    async def on_token(count: int) -> None:
        if count == at_count:
            tasks.append(asyncio.create_task(h.coordinator.migrate("r1", target, MigrationReason.DRAIN)))

    tokens = await h.run(_request(), on_token)
    return tokens, (await tasks[0])


async def test_stop_refused_leaves_the_request_where_it_was() -> None:
    h = Harness(_engines(2))
    h.engines["d0"].refuse_stop = True
    tokens, result = await _one_migration(h)
    assert tokens == _expected(h.engines["d0"])
    assert (result.outcome, result.stage) == (MigrationOutcome.REJECTED, MigrationStage.STOP)
    assert not h.engines["d1"].submitted and h.held() == 0


async def test_target_never_reserves_source_releases_target_recomputes() -> None:
    h = Harness(_engines(2))
    h.inbox.silent.add("d1")
    tokens, result = await _one_migration(h)
    assert tokens == _expected(h.engines["d0"])
    assert (result.outcome, result.stage) == (MigrationOutcome.ABORTED, MigrationStage.RESERVE)
    assert h.held() == 0


async def test_empty_reservation_releases_the_source() -> None:
    h = Harness(_engines(2))
    h.inbox.empty.add("d1")
    tokens, result = await _one_migration(h)
    assert tokens == _expected(h.engines["d0"])
    assert result.outcome is MigrationOutcome.ABORTED and "empty" in result.error
    assert h.held() == 0


async def test_dead_target_the_stream_recovers_and_no_block_is_held() -> None:
    engines = _engines(3)
    engines[1].dead = True
    h = Harness(engines)
    tokens, result = await _one_migration(h)
    assert tokens == _expected(h.engines["d0"])  # recovered by recompute on d2 (or d0)
    assert result.outcome is MigrationOutcome.ABORTED
    assert h.held() == 0


async def test_switch_called_off_releases_and_resumes_on_the_source() -> None:
    h = Harness(_engines(2), CoordinatorConfig(switch_timeout_s=0.05, reservation_timeout_s=0.3))
    real_stop = h.engines["d0"].stop

    async def stop_and_lie(request_id: str):
        stopped = await real_stop(request_id)
        # claim one token more than the stream will ever read from d0: the boundary never comes
        return type(stopped)(stopped.request_id, stopped.prompt_token_ids, [*stopped.output_token_ids, 11],
                             stopped.num_computed_tokens + 1)

    h.engines["d0"].stop = stop_and_lie  # type: ignore[method-assign]
    tokens, result = await _one_migration(h)
    assert (result.outcome, result.stage) == (MigrationOutcome.ABORTED, MigrationStage.SWITCH)
    assert tokens == _expected(h.engines["d0"])  # went on on d0 by recompute
    assert h.held() == 0
    assert not any((r.sampling_params.extra_args or {}).get("kv_transfer_params") for r in h.engines["d1"].submitted)


async def test_unknown_or_finished_request_is_rejected() -> None:
    h = Harness(_engines(2))
    result = await h.coordinator.migrate("nope", "d1")
    assert result.outcome is MigrationOutcome.REJECTED and h.coordinator.results[-1] is result


async def test_running_lists_live_streams_for_the_policy() -> None:
    h = Harness(_engines(2))
    seen = []

    async def on_token(count: int) -> None:
        if count == 3:
            seen.extend(h.coordinator.running())

    await h.run(_request(), on_token)
    assert [(r.request_id, r.instance_id, r.context_tokens) for r in seen] == [("r1", "d0", len(PROMPT) + 3)]


async def test_results_feed_the_migration_metrics() -> None:
    from pdserve.shared.metrics import Metrics

    metrics = Metrics("demo")
    h = Harness(_engines(2))
    h.coordinator.on_result = metrics.observe_migration
    h.inbox.silent.add("d1")
    await _one_migration(h)  # aborted at reserve
    h.inbox.silent.clear()
    await _one_migration(h)  # completed
    text = metrics.render().decode()
    assert 'pdserve:migrations_total{model_name="demo",outcome="aborted",reason="drain"} 1.0' in text
    assert 'pdserve:migrations_total{model_name="demo",outcome="completed",reason="drain"} 1.0' in text
    assert 'pdserve:migration_aborts_total{model_name="demo",stage="reserve"} 1.0' in text
    assert 'pdserve:migration_downtime_seconds_count{model_name="demo"} 1.0' in text
    assert 'pdserve:migration_stages_sum{model_name="demo"} 1.0' in text


async def test_drain_moves_every_stream_off_the_instance() -> None:
    from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot

    h = Harness(_engines(3, interval=0.01))
    h.coordinator.cluster = lambda: ClusterSnapshot(tuple(
        InstanceSnapshot(e.instance_id, Role.DECODE, kv_blocks_total=100, kv_blocks_free=100)
        for e in h.engines.values()))
    outcome = []

    async def on_token(count: int) -> None:
        if count == 3:
            outcome.append(asyncio.create_task(h.coordinator.drain("d0", 5.0)))

    tokens = await asyncio.gather(h.run(_request("r1"), on_token), h.run(_request("r2"), _noop))
    assert await outcome[0] is True
    assert not h.recovery.streams.on("d0") and h.held() == 0
    assert all(t == _expected(h.engines["d0"]) for t in tokens)
    assert {r.outcome for r in h.coordinator.results} == {MigrationOutcome.COMPLETED}
    assert {r.reason for r in h.coordinator.results} == {MigrationReason.DRAIN}


async def _noop(count: int) -> None:
    return None


def test_attach_needs_an_inbox_and_sets_the_routers_migrator() -> None:
    from pdserve.router.controller import Router
    from pdserve.router.migration import attach
    from pdserve.router.registry import make_policy
    from pdserve.shared.config import MigrationConfig, ServeConfig
    from pdserve.shared.errors import ConfigError

    assert ServeConfig().migration.enabled is False  # off unless asked for

    engines = _engines(2)
    with pytest.raises(ConfigError):
        attach(Router(engines, make_policy("least_loaded")))
    router = Router(engines, make_policy("least_loaded"), inbox=Inbox(*engines))
    coordinator = attach(router, MigrationConfig(enabled=True, kv_spread=0.5, reservation_timeout_s=3.0))
    assert router.migrator is coordinator and coordinator.streams is router.recovery.streams
    assert coordinator.policy.kv_spread == 0.5 and coordinator.config.reservation_timeout_s == 3.0
    assert coordinator.decide() == []  # nothing runs


async def test_run_policy_applies_the_policys_moves_each_interval() -> None:
    from types import SimpleNamespace

    from pdserve.router.migration import run_policy
    from pdserve.router.migration_policy import Migration

    applied, asked = [], []

    class Migrator:
        def decide(self, draining):
            asked.append(draining)
            return [Migration("r", "d0", "d1", MigrationReason.DRAIN)] if len(asked) == 2 else []

        async def apply(self, moves):
            applied.extend(moves)

    task = asyncio.create_task(run_policy(SimpleNamespace(migrator=Migrator(), draining={"d0"}), 0.01))
    while len(asked) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    assert asked[0] == frozenset({"d0"}) and [m.request_id for m in applied] == ["r"]
