"""When to move a decoding request to another decode instance: a pure policy, shared with the simulator.

`decide(snapshot, config) -> list[Migration]` reads a `MigrationSnapshot`
(the cluster's instances, the requests decoding on them, which instances
drain, which requests move already, each instance's predicted TPOT) and
returns the migrations to start now. No I/O, no clocks, no vLLM: the
controller (`router.migration`) does the moving, the simulator can run the
same decisions against its model.

Triggers, in the order they claim capacity (each request moves at most once
per call, and no instance takes part in more than `max_per_instance`
migrations at once, counting those already in flight):

1. DRAIN: every request on a draining decode instance, largest first (the
   drain ends when the last leaves), to whichever instance has room.
2. PREEMPTION: an instance whose KV use is at `preempt_kv_usage` or above
   would soon pre-empt (vLLM recomputes the victim from scratch); it sheds
   its shortest requests (cheapest to move) until below the mark.
3. PRIORITY: an instance whose predicted TPOT breaks the tightest TPOT SLO of
   an interactive request on it moves batch-class requests elsewhere.
4. LOAD_BALANCE: when the spread of KV use between the most and least used
   decode instances exceeds `kv_spread`, or the predicted TPOT of the slowest
   is above `tpot_spread` times the fastest's, one request of about half the
   KV gap moves from the first to the second.

A target is a healthy decode instance, not draining, other than the source,
with free blocks for the request's context plus `headroom_blocks`; the least
used such instance wins. Blocks a decision claims are counted against the
target for the next decision of the same call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot
from pdserve.shared.roles import Role
from pdserve.shared.slo import Priority


class MigrationReason(str, enum.Enum):
    DRAIN = "drain"
    PREEMPTION = "preemption"
    PRIORITY = "priority"
    LOAD_BALANCE = "load_balance"


@dataclass(frozen=True)
class RunningRequest:
    """A request decoding on an instance, as the router tracks it."""

    request_id: str
    instance_id: str
    context_tokens: int  # prompt + tokens generated so far (what its KV holds)
    priority: Priority = Priority.INTERACTIVE
    tpot_slo_s: float | None = None  # its TPOT target (None: none)
    migratable: bool = True  # False: n > 1, still prefilling, or finishing


@dataclass(frozen=True)
class MigrationSnapshot:
    cluster: ClusterSnapshot
    running: tuple[RunningRequest, ...] = ()
    draining: frozenset[str] = frozenset()
    in_flight: tuple[tuple[str, str, str], ...] = ()  # (request, source, target) of migrations under way
    tpot_s: dict[str, float] = field(default_factory=dict)  # predicted TPOT per instance (missing: unknown)


@dataclass(frozen=True)
class Migration:
    request_id: str
    source: str
    target: str
    reason: MigrationReason


@dataclass(frozen=True)
class MigrationPolicyConfig:
    kv_spread: float = 0.3  # KV-use difference (0..1) between decode instances that triggers a move
    tpot_spread: float = 1.5  # slowest/fastest predicted TPOT ratio that triggers a move
    preempt_kv_usage: float = 0.9  # KV use at which an instance sheds requests instead of pre-empting
    headroom_blocks: int = 4  # free blocks a target keeps after taking a request
    max_per_instance: int = 1  # concurrent migrations an instance takes part in (source or target)
    min_context_tokens: int = 0  # requests shorter than this are not worth moving for balance


class _Plan:
    """The decisions of one call, and what they claimed so far."""

    def __init__(self, snap: MigrationSnapshot, config: MigrationPolicyConfig) -> None:
        self.snap, self.config = snap, config
        self.decode = {i.instance_id: i for i in snap.cluster.instances
                       if i.healthy and i.role in (Role.DECODE, Role.MIXED)}
        self.free = {iid: i.kv_blocks_free for iid, i in self.decode.items()}
        self.busy: dict[str, int] = {}
        moving = set()
        for rid, source, target in snap.in_flight:
            moving.add(rid)
            for iid in (source, target):
                self.busy[iid] = self.busy.get(iid, 0) + 1
        self.moving = moving
        self.out: list[Migration] = []

    def usage(self, iid: str) -> float:
        inst = self.decode[iid]
        return 1.0 - self.free[iid] / inst.kv_blocks_total if inst.kv_blocks_total > 0 else 0.0

    def can_take_part(self, iid: str) -> bool:
        return self.busy.get(iid, 0) < self.config.max_per_instance

    def requests_on(self, iid: str) -> list[RunningRequest]:
        return [r for r in self.snap.running
                if r.instance_id == iid and r.migratable and r.request_id not in self.moving]

    def target_for(self, request: RunningRequest, exclude: set[str]) -> str | None:
        need = self.decode[request.instance_id].blocks_for(request.context_tokens) + self.config.headroom_blocks
        options = [iid for iid in self.decode if iid != request.instance_id and iid not in self.snap.draining
                   and iid not in exclude and self.can_take_part(iid) and self.free[iid] >= need]
        return min(options, key=lambda iid: (self.usage(iid), iid)) if options else None

    def move(self, request: RunningRequest, reason: MigrationReason, exclude: set[str] = frozenset()) -> bool:
        if not self.can_take_part(request.instance_id):
            return False
        target = self.target_for(request, set(exclude))
        if target is None:
            return False
        blocks = self.decode[request.instance_id].blocks_for(request.context_tokens)
        self.free[target] -= blocks
        self.free[request.instance_id] += blocks
        for iid in (request.instance_id, target):
            self.busy[iid] = self.busy.get(iid, 0) + 1
        self.moving.add(request.request_id)
        self.out.append(Migration(request.request_id, request.instance_id, target, reason))
        return True


def _drain(plan: _Plan) -> None:
    for iid in sorted(plan.snap.draining & set(plan.decode)):
        for request in sorted(plan.requests_on(iid), key=lambda r: (-r.context_tokens, r.request_id)):
            if not plan.move(request, MigrationReason.DRAIN):
                break  # no room or the instance's migration slots are full: the next call goes on


def _preemption(plan: _Plan) -> None:
    for iid in sorted(plan.decode):
        if iid in plan.snap.draining:
            continue
        for request in sorted(plan.requests_on(iid), key=lambda r: (r.context_tokens, r.request_id)):
            if plan.usage(iid) < plan.config.preempt_kv_usage or not plan.move(request, MigrationReason.PREEMPTION):
                break


def _priority(plan: _Plan) -> None:
    for iid in sorted(plan.decode):
        predicted = plan.snap.tpot_s.get(iid)
        here = plan.requests_on(iid)
        slos = [r.tpot_slo_s for r in here if r.priority is Priority.INTERACTIVE and r.tpot_slo_s is not None]
        if iid in plan.snap.draining or predicted is None or not slos or predicted <= min(slos):
            continue
        # Only to an instance predicted faster: moving the load to an equally slow one saves nobody.
        slower = {t for t in plan.decode if plan.snap.tpot_s.get(t, 0.0) >= predicted}
        batch = [r for r in here if r.priority is Priority.BATCH]
        for request in sorted(batch, key=lambda r: (-r.context_tokens, r.request_id)):
            if not plan.move(request, MigrationReason.PRIORITY, exclude=slower):
                break


def _balance(plan: _Plan) -> None:
    live = [iid for iid in plan.decode if iid not in plan.snap.draining]
    if len(live) < 2:
        return
    hot = max(live, key=lambda iid: (plan.usage(iid), iid))
    cold = min(live, key=lambda iid: (plan.usage(iid), iid))
    gap = plan.usage(hot) - plan.usage(cold)
    tpot_hot, tpot_cold = plan.snap.tpot_s.get(hot), plan.snap.tpot_s.get(cold)
    slow = tpot_hot is not None and tpot_cold and tpot_hot > plan.config.tpot_spread * tpot_cold
    if gap <= plan.config.kv_spread and not slow:
        return
    inst: InstanceSnapshot = plan.decode[hot]
    half_gap_blocks = gap * inst.kv_blocks_total / 2
    candidates = [r for r in plan.requests_on(hot) if r.context_tokens >= plan.config.min_context_tokens]
    if gap > plan.config.kv_spread:
        # The request whose blocks come closest to half the gap evens the two best; none larger than the gap.
        order = sorted((r for r in candidates if inst.blocks_for(r.context_tokens) <= 2 * half_gap_blocks),
                       key=lambda r: (abs(inst.blocks_for(r.context_tokens) - half_gap_blocks), r.request_id))
    else:  # TPOT spread alone: the cheapest request to move
        order = sorted(candidates, key=lambda r: (r.context_tokens, r.request_id))
    for request in order:
        if plan.move(request, MigrationReason.LOAD_BALANCE, exclude=set(live) - {cold}):
            return


def decide(snapshot: MigrationSnapshot, config: MigrationPolicyConfig | None = None) -> list[Migration]:
    """The migrations to start now (possibly none)."""
    plan = _Plan(snapshot, config or MigrationPolicyConfig())
    for trigger in (_drain, _preemption, _priority, _balance):
        trigger(plan)
    return plan.out
