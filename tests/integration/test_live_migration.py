"""Live migration between two real decode instances (vLLM-CPU engines in Ray actors, demo model).

One cluster for the module: 1 prefill + 2 decode `EngineWorker` actors (the
pools the server starts), the router's reservation inbox, resumable streams
over P->D handoffs, and the migration coordinator. The tests play the
router: they stream a request and ask the coordinator to move it while it
decodes, then compare the client's tokens with the same request unmoved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from typing import Any

import pytest

# One event loop for the module: the clients' output pumps live on it across tests.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ray = pytest.importorskip("ray")
pytest.importorskip("vllm")

from pdserve.kv_transfer.reservations import ReservationInbox  # noqa: E402
from pdserve.router.handoff import Handoff  # noqa: E402
from pdserve.router.migration import CoordinatorConfig, MigrationCoordinator, MigrationOutcome  # noqa: E402
from pdserve.router.resume import StreamRecovery  # noqa: E402
from pdserve.shared.config import EngineConfig, KVTransferConfig, PoolConfig, PoolsConfig  # noqa: E402
from pdserve.shared.protocol import EngineRequest  # noqa: E402
from pdserve.worker.migration import migration_ops  # noqa: E402
from pdserve.worker.pool import start_pools, stop_pools  # noqa: E402

VOCAB = 4096
MAX_TOKENS = 64


class Cluster:
    def __init__(self) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-migration-test")
        engine = EngineConfig(max_model_len=2048, kv_cache_memory_bytes=64 << 20)
        pools = PoolsConfig(prefill=PoolConfig(instances=1), decode=PoolConfig(instances=2))
        self.pools = start_pools(engine, pools, kv=KVTransferConfig(transfer_timeout_s=30, bind_host="127.0.0.1"))
        self.by_id = {c.instance_id: c for c in self.pools.clients}
        self.prefill = next(c for c in self.pools.clients if c.info.role.value == "prefill")
        self.decode = sorted((c for c in self.pools.clients if c.info.role.value == "decode"),
                             key=lambda c: c.instance_id)
        self.inbox = ReservationInbox("127.0.0.1")
        self.inbox.start()
        self.recovery = StreamRecovery()
        self.coordinator = MigrationCoordinator(self.recovery.streams, self.by_id, self.inbox,
                                                CoordinatorConfig(reservation_timeout_s=10, transfer_timeout_s=30))

    def pick(self, exclude: set[str], prompt_tokens: int):
        return next((c for c in self.decode if c.instance_id not in exclude), None)

    async def stream(self, request: EngineRequest, on_tokens=None) -> list[int]:
        """The client's tokens of `request` through P -> decode-0; `on_tokens(count)` after each delta."""
        handoff = Handoff(self.prefill, self.decode[0], self.inbox, 60.0, 60.0, {})
        tokens: list[int] = []
        async with contextlib.aclosing(self.recovery.wrap(request, handoff.stream, handoff.where,
                                                          self.pick)) as deltas:
            async for delta in deltas:
                tokens.extend(delta.token_ids)
                if on_tokens is not None:
                    await on_tokens(len(tokens))
        return tokens

    async def idle_usage(self, timeout_s: float = 20.0) -> dict[str, float]:
        """Each instance's KV use once nothing runs (the worker's probe answers a call late: poll)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = {c.instance_id: await c.stats() for c in self.pools.clients}
            usage = {iid: s.kv_usage for iid, s in stats.items()}
            if all(u == 0 for u in usage.values()) or time.monotonic() > deadline:
                return usage
            await asyncio.sleep(0.5)

    def close(self) -> None:
        self.inbox.close()
        stop_pools(self.pools)
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster():
    started = time.monotonic()
    c = Cluster()
    print(f"\n1 P + 2 D started in {time.monotonic() - started:.1f}s")
    try:
        yield c
    finally:
        c.close()


def _request(rid: str, length: int = 300, prompt_seed: int = 3, **params: Any) -> EngineRequest:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    rng = random.Random(prompt_seed)
    prompt = [rng.randrange(3, VOCAB) for _ in range(length)]
    sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, **params}
    # Deltas, as the gateway asks for them: the streams count tokens from them.
    return EngineRequest(rid, prompt, SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling))


async def _migrated(cluster: Cluster, request: EngineRequest, moves: int, every: int = 6):
    """Stream `request`, moving it to the other decode instance after every `every` tokens, `moves` times."""
    due = {every * (k + 1): cluster.decode[(k + 1) % 2].instance_id for k in range(moves)}
    runs: list[asyncio.Task] = []

    async def on_tokens(count: int) -> None:
        for at in [a for a in due if a <= count]:
            if runs and not runs[-1].done():
                return  # one move at a time: the next waits for this one
            runs.append(asyncio.create_task(cluster.coordinator.migrate(request.request_id, due.pop(at))))

    tokens = await cluster.stream(request, on_tokens)
    return tokens, [await r for r in runs]


@pytest.mark.parametrize("moves", [1, 2, 5])
async def test_greedy_output_with_migrations_equals_unmigrated(cluster: Cluster, moves: int) -> None:
    reference = await cluster.stream(_request(f"ref-{moves}", prompt_seed=moves))
    tokens, results = await _migrated(cluster, _request(f"mig-{moves}", prompt_seed=moves), moves)
    print(f"\n{moves} moves: " + ", ".join(f"{r.outcome.value}@{r.tokens} {r.blocks} blocks "
                                         f"{(r.downtime_s or 0) * 1e3:.0f} ms" for r in results))
    assert tokens == reference
    assert [r.outcome for r in results] == [MigrationOutcome.COMPLETED] * moves, [r.error for r in results]
    assert await cluster.idle_usage() == {c.instance_id: 0.0 for c in cluster.pools.clients}


async def test_seeded_sampled_request_migrated_equals_unmigrated(cluster: Cluster) -> None:
    params = {"temperature": 0.9, "seed": 1234}
    reference = await cluster.stream(_request("ref-seeded", prompt_seed=9, **params))
    tokens, results = await _migrated(cluster, _request("mig-seeded", prompt_seed=9, **params), moves=2)
    assert [r.outcome for r in results] == [MigrationOutcome.COMPLETED] * 2, [r.error for r in results]
    assert tokens == reference


async def test_stop_then_release_frees_the_source_and_the_client_leaving_mid_move_leaks_nothing(
        cluster: Cluster) -> None:
    # A stop whose target never comes: the held blocks are released and counted free.
    request = _request("held", prompt_seed=21, max_tokens=400)
    done = asyncio.Event()

    async def stop_and_release(count: int) -> None:
        if count == 5 and not done.is_set():
            done.set()
            stream = cluster.recovery.streams.get("held")
            ops = migration_ops(cluster.by_id[stream.instance_id])
            await ops.stop(stream.engine_request_id)
            assert await ops.release(stream.engine_request_id) is True
            raise asyncio.CancelledError  # the client leaves: its stream is closed

    with contextlib.suppress(asyncio.CancelledError):
        await cluster.stream(request, stop_and_release)
    # The client leaving while a migration runs: whatever stage it reached, nothing stays held.
    for leave_at in (0.0, 0.05, 0.3):
        moved = asyncio.Event()

        async def leave(count: int, leave_at: float = leave_at) -> None:
            if count == 5 and not moved.is_set():
                moved.set()
                asyncio.get_running_loop().create_task(
                    cluster.coordinator.migrate(f"leave-{leave_at}", cluster.decode[1].instance_id))
                await asyncio.sleep(leave_at)
                raise asyncio.CancelledError

        with contextlib.suppress(asyncio.CancelledError):
            await cluster.stream(_request(f"leave-{leave_at}", prompt_seed=30, max_tokens=400), leave)
    await asyncio.sleep(1.0)  # a coordinator still waiting for a reservation gives up and releases
    assert await cluster.idle_usage(40.0) == {c.instance_id: 0.0 for c in cluster.pools.clients}
