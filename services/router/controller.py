"""The router's thin controller: instance registry, health, stats, placement.

Lifecycle of a placement:
  RequestInfo -> snapshot of the instances' latest stats -> policy.decide()
  -> Placement (an instance's client) or Rejection (a typed error)
The controller does the I/O (polling stats, counting outstanding requests);
the decision itself is the pure policy in `pdserve.router.policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

from pdserve.router.policy import PlacementPolicy
from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot, Rejection, RequestInfo
from pdserve.shared.errors import CapacityError, ContextLengthExceededError
from pdserve.shared.protocol import EngineStats
from pdserve.worker.client import EngineClient

logger = logging.getLogger(__name__)


class Router:
    """Places requests on instances with a pure policy over a stats snapshot."""

    def __init__(self, clients: list[EngineClient], policy: PlacementPolicy,
                 on_stats: Callable[[EngineStats], None] | None = None) -> None:
        if not clients:
            raise ValueError("the router needs at least one instance")
        self.clients = {c.instance_id: c for c in clients}
        self.policy = policy
        self._on_stats = on_stats
        self._stats: dict[str, EngineStats] = {}
        self._outstanding: dict[str, int] = {iid: 0 for iid in self.clients}
        self._outstanding_prompt: dict[str, int] = {iid: 0 for iid in self.clients}
        self._poller: asyncio.Task | None = None

    def snapshot(self) -> ClusterSnapshot:
        instances = tuple(
            InstanceSnapshot(
                instance_id=stats.instance_id,
                role=stats.role,
                healthy=stats.healthy,
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                outstanding=self._outstanding[stats.instance_id],
                outstanding_prefill_tokens=self._outstanding_prompt[stats.instance_id],
                kv_blocks_total=stats.kv_blocks_total,
                kv_blocks_free=stats.kv_blocks_free,
                block_size=self.clients[stats.instance_id].info.block_size,
            )
            for stats in self.latest_stats()
        )
        return ClusterSnapshot(instances, now=time.monotonic())

    def latest_stats(self) -> list[EngineStats]:
        """Every instance's last reported stats (healthy until a report says otherwise)."""
        return [self._stats.get(iid) or EngineStats(iid, c.info.role, kv_blocks_total=c.info.kv_blocks_total)
                for iid, c in self.clients.items()]

    def place(self, request: RequestInfo) -> EngineClient:
        """The instance to run `request` on; raises if it cannot be placed."""
        decision = self.policy.decide(request, self.snapshot())
        if isinstance(decision, Rejection):
            if decision.retryable:
                raise CapacityError(decision.reason)
            raise ContextLengthExceededError(decision.reason)
        # Colocated serving for now: prefill == decode (the disaggregated path adds the handoff).
        return self.clients[decision.decode]

    @contextlib.contextmanager
    def track(self, instance_id: str, prompt_tokens: int):
        """Count a request as outstanding on an instance while the block runs."""
        self._outstanding[instance_id] += 1
        self._outstanding_prompt[instance_id] += prompt_tokens
        try:
            yield
        finally:
            self._outstanding[instance_id] -= 1
            self._outstanding_prompt[instance_id] -= prompt_tokens

    async def refresh(self) -> None:
        """Fetch every instance's stats once."""
        results = await asyncio.gather(*(c.stats() for c in self.clients.values()), return_exceptions=True)
        for (iid, client), result in zip(self.clients.items(), results):
            if isinstance(result, BaseException):
                logger.warning("stats of %s failed: %s", iid, result)
                result = EngineStats(iid, client.info.role, healthy=False)
            self._stats[iid] = result
            if self._on_stats is not None:
                self._on_stats(result)

    def start(self, interval_s: float) -> None:
        async def poll() -> None:
            while True:
                await self.refresh()
                await asyncio.sleep(interval_s)

        self._poller = asyncio.get_running_loop().create_task(poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)
