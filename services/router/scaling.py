"""Adding and removing engine instances while serving (`pdserve scale`, `POST /admin/scale`).

Lifecycle of a scale request:
  targets (instances per role) -> `plan_scale` (pure: what to add, what to
  remove, or a ScaleError saying why not) -> for each instance to add, the
  factory starts one (shown as STARTING in `/admin/instances` meanwhile) and
  the router registers it once its engine is up: placements use it from the
  next request on -> for each one to remove (newest first), the router
  drains it (no new placements; its requests finish, up to the drain
  timeout), forgets it, and the factory stops it.
A start that fails is logged and counted, and the instance never joins.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.router.controller import Router
from pdserve.shared.errors import InvalidRequestError
from pdserve.shared.roles import Role
from pdserve.worker.client import EngineClient

logger = logging.getLogger(__name__)


class ScaleError(InvalidRequestError):
    """A scale request the cluster cannot take (it answers 400)."""


class InstanceFactory(Protocol):
    async def start(self, role: Role) -> EngineClient: ...
    async def stop(self, client: EngineClient) -> None: ...


@dataclass(frozen=True)
class ScalePlan:
    add: dict[Role, int] = field(default_factory=dict)
    remove: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"add": {role.value: n for role, n in self.add.items() if n}, "remove": list(self.remove)}


def _ordinal(instance_id: str) -> int:
    tail = instance_id.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def plan_scale(current: dict[Role, list[str]], starting: dict[Role, int], targets: dict[Role, int],
               disaggregated: bool) -> ScalePlan:
    """What to add and remove to reach `targets` (roles not named keep their count).

    `current`: the instances of each role that are registered and not draining;
    `starting`: instances of each role already on their way up.
    """
    want = {role: targets.get(role, len(current.get(role, [])) + starting.get(role, 0)) for role in Role}
    for role, count in want.items():
        if count < 0:
            raise ScaleError(f"{role.value}: an instance count cannot be negative", param=role.value)
    if sum(want.values()) == 0:
        raise ScaleError("at least one instance must remain")
    if (want[Role.PREFILL] == 0) != (want[Role.DECODE] == 0):
        # Allowed (replacing a pool's last instance): the policy runs requests whole on the pool that is left.
        logger.warning("scaling to prefill=%d, decode=%d: requests run whole on the remaining pool",
                       want[Role.PREFILL], want[Role.DECODE])
    if not disaggregated and (want[Role.PREFILL] or want[Role.DECODE]):
        raise ScaleError("this server was started without disaggregated pools (no reservation inbox): "
                         "restart it with prefill and decode instances to scale them")
    add: dict[Role, int] = {}
    remove: list[str] = []
    for role in Role:
        have = len(current.get(role, [])) + starting.get(role, 0)
        if want[role] > have:
            add[role] = want[role] - have
        elif want[role] < have:
            surplus = have - want[role]
            if surplus > len(current.get(role, [])):
                raise ScaleError(f"{role.value}: {starting.get(role, 0)} instance(s) are still starting; "
                                 "wait for them before shrinking below that")
            newest = sorted(current.get(role, []), key=_ordinal, reverse=True)
            remove.extend(newest[:surplus])
    return ScalePlan(add, tuple(remove))


def plan_drain(current: dict[Role, list[str]], starting: dict[Role, int], ids: list[str],
               replace: bool) -> ScalePlan:
    """Remove exactly `ids` (a node going away, an evicted pod); with `replace`, start as many of each
    role elsewhere so the pools keep their size. `current` and `starting` mean what they do in plan_scale."""
    if not ids:
        raise ScaleError("name at least one instance to drain", param="instances")
    role_of = {iid: role for role, iids in current.items() for iid in iids}
    unknown = [iid for iid in ids if iid not in role_of]
    if unknown:
        raise ScaleError(f"not a serving instance (unknown, or already leaving): {', '.join(unknown)}",
                         param="instances")
    removed = list(dict.fromkeys(ids))  # a name given twice drains once
    add: dict[Role, int] = {}
    if replace:
        for iid in removed:
            add[role_of[iid]] = add.get(role_of[iid], 0) + 1
    left = len(role_of) - len(removed) + sum(starting.values()) + sum(add.values())
    if left == 0:
        raise ScaleError("at least one instance must remain", param="instances")
    return ScalePlan(add, tuple(removed))


class Scaler:
    """Applies scale plans against the live router with an instance factory."""

    def __init__(self, router: Router, factory: InstanceFactory, disaggregated: bool,
                 drain_timeout_s: float = 600.0) -> None:
        self.router, self.factory, self.disaggregated = router, factory, disaggregated
        self.drain_timeout_s = drain_timeout_s
        self.starting: dict[Role, int] = {}
        self.counters = {"started": 0, "start_failures": 0, "removed": 0, "drain_timeouts": 0}
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()

    def _current(self) -> dict[Role, list[str]]:
        out: dict[Role, list[str]] = {}
        for iid, client in self.router.clients.items():
            if iid not in self.router.draining:
                out.setdefault(client.info.role, []).append(iid)
        return out

    async def scale(self, targets: dict[Role, int]) -> ScalePlan:
        """Plan and start applying; returns at once (engines take tens of seconds to come up)."""
        async with self._lock:  # two scale calls must not both count the same surplus
            plan = plan_scale(self._current(), self.starting, targets, self.disaggregated)
            self._apply(plan)
        logger.info("scaling: %s", plan.to_dict())
        return plan

    async def drain(self, ids: list[str], replace: bool = False) -> ScalePlan:
        """Drain and remove the named instances (optionally replaced elsewhere); returns at once."""
        async with self._lock:
            plan = plan_drain(self._current(), self.starting, ids, replace)
            self._apply(plan)
        logger.info("draining: %s", plan.to_dict())
        return plan

    def _apply(self, plan: ScalePlan) -> None:
        for role, count in plan.add.items():
            self.starting[role] = self.starting.get(role, 0) + count
            for _ in range(count):
                self._spawn(self._add(role))
        for iid in plan.remove:
            self.router.draining.add(iid)  # at once: the next placement already avoids it
            self._spawn(self._remove(iid))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add(self, role: Role) -> None:
        try:
            client = await self.factory.start(role)
        except Exception as exc:  # noqa: BLE001 - counted and logged; the instance never joins
            self.counters["start_failures"] += 1
            logger.error("scaling: a new %s instance failed to start: %s", role.value, exc)
            return
        finally:
            self.starting[role] -= 1
        self.router.register(client)
        self.counters["started"] += 1

    async def _remove(self, iid: str) -> None:
        # Live migration on (router.migration): its requests move off instead of finishing there. The
        # ledger still counts moved requests on this instance, so its wait is skipped once all moved.
        migrator = self.router.migrator
        moved_all = migrator is not None and await migrator.drain(iid, self.drain_timeout_s)
        if not moved_all and not await self.router.drain(iid, self.drain_timeout_s):
            self.counters["drain_timeouts"] += 1
        client = self.router.unregister(iid)
        await self.factory.stop(client)
        self.counters["removed"] += 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
