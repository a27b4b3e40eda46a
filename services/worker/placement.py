"""Where a CPU engine instance's processes run: cores and scheduling priority.

Lifecycle (local Ray on a CPU machine, `pools.bind_cores`):
  launcher: plan_cores() gives every instance its compute cores and keeps the
  rest for the front end (gateway, Ray's daemons, every engine's scheduler
  process); the launcher pins itself to the front-end cores before Ray starts,
  so everything Ray starts inherits them.
  instance (EngineWorker.start): restore_priority() undoes Ray's worker
  niceness; spawn_affinity() lets the thread that spawns vLLM's engine core
  reach the instance's compute cores, where vLLM's CPU worker binds its OpenMP
  threads (VLLM_CPU_OMP_THREADS_BIND); pin_to_front() then moves the actor's
  and the engine core's own threads (not the model worker's) to the front end.
With no core left over for the front end (e.g. 1 prefill + 1 decode on two
cores) only the compute threads are bound and the rest floats, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

logger = logging.getLogger(__name__)

# Environment an instance's actor gets: its compute cores (vLLM's own variable) and the front end's.
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
FRONT_ENV = "PDSERVE_FRONTEND_CORES"
# vLLM's model worker processes: their threads are bound by vLLM itself.
WORKER_PREFIX = "VLLM::Worker"


def format_cores(cores: list[int] | set[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def parse_cores(text: str | None) -> set[int]:
    """'0,2-3' -> {0, 2, 3}; '' or None -> empty."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


@dataclass
class CorePlan:
    """Compute cores per instance, and the cores no engine computes on (the front end's)."""

    engines: dict[str, list[int]] = field(default_factory=dict)
    front: list[int] = field(default_factory=list)  # empty: the front end shares the engines' cores

    def env(self, instance_id: str) -> dict[str, str]:
        """What the instance's actor is started with."""
        cores = self.engines.get(instance_id)
        if not cores:
            return {}
        env = {BIND_ENV: format_cores(cores)}
        if self.front:
            env[FRONT_ENV] = format_cores(self.front)
        return env


def assign(sizes: list[int], available: list[int], taken: set[int] | None = None) -> list[list[int]]:
    """Core lists for instances of `sizes` cores, disjoint from each other and from `taken` while cores last.

    Cores are handed out in order from the free ones; when they run out, the
    lists wrap around the available cores and instances share (logged).
    """
    if not available:
        raise ValueError("no CPU cores to bind instances to")
    free = [c for c in available if c not in (taken or set())]
    need = sum(max(1, min(s, len(available))) for s in sizes)
    if need > len(free):
        logger.warning("instances need %d core(s), %d free of %d: some share cores", need, len(free),
                       len(available))
    order = free + [c for c in available if c not in free]  # taken cores last: shared only when all are
    out, at = [], 0
    for size in sizes:
        size = max(1, min(size, len(available)))
        out.append(sorted({order[(at + k) % len(order)] for k in range(size)}))
        at += size
    return out


def plan_cores(instances: list[tuple[str, int]], available: list[int]) -> CorePlan:
    """Compute cores for every (instance id, cores it reserves); the front end keeps what is left."""
    lists = assign([size for _, size in instances], available)
    used = {c for cores in lists for c in cores}
    plan = CorePlan(dict(zip([iid for iid, _ in instances], lists)), [c for c in available if c not in used])
    if not plan.front:
        logger.warning("no core left for the front end (gateway, Ray, engine schedulers): it shares the "
                       "engines' %d core(s)", len(available))
    return plan


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return [pid]


def set_process_affinity(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` on `cores` (sched_setaffinity moves one thread only)."""
    for tid in _threads(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cores)


def pin_launcher(plan: CorePlan | None) -> None:
    """This process (and what it starts from now on: Ray's daemons, its workers) on the front-end cores."""
    if plan is not None and plan.front:
        set_process_affinity(os.getpid(), set(plan.front))
        logger.info("front end on core(s) %s; engines on %s", format_cores(plan.front),
                    {iid: format_cores(c) for iid, c in plan.engines.items()})


def restore_priority() -> int:
    """Undo Ray's worker niceness (15 by default) for an engine: a niced engine loses its core to anything.

    Answers the niceness now; raising priority needs CAP_SYS_NICE where the
    launcher could not have Ray start workers at 0 (a joined cluster).
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            current = 0
        except PermissionError:
            logger.warning("engine runs at niceness %d (Ray's worker_niceness; start Ray with "
                           "RAY_worker_niceness=0 to serve at normal priority)", current)
    return current


@contextlib.contextmanager
def spawn_affinity() -> Iterator[None]:
    """The calling thread may run on its compute and front-end cores while it spawns the engine core.

    Children inherit the spawning thread's mask, and vLLM's worker can only
    bind its OpenMP threads inside that mask.
    """
    compute, front = parse_cores(os.environ.get(BIND_ENV)), parse_cores(os.environ.get(FRONT_ENV))
    if not compute or not front:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, compute | front)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_to_front() -> dict[int, set[int]]:
    """This actor's threads and its engine core's (not the model workers') on the front-end cores.

    Answers {pid: cores} for what it moved; nothing without front-end cores.
    """
    import psutil

    front = parse_cores(os.environ.get(FRONT_ENV))
    if not front or not parse_cores(os.environ.get(BIND_ENV)):
        return {}
    moved = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if proc.name().startswith(WORKER_PREFIX):
                continue
            set_process_affinity(proc.pid, front)
            moved[proc.pid] = front
    return moved
