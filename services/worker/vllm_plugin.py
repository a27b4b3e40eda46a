"""pdserve's vLLM general plugin: fixes vLLM-CPU needs before any request runs.

vLLM loads every `vllm.general_plugins` entry point in each of its processes
(the front end, the engine core, the workers); ours is registered in
pyproject.toml and does four things (the third, live migration's engine-core
utilities and the seeded generator's catch-up, lives in `worker.migration`;
the fourth, on CPU, bounds the engine's shared-memory busy-wait: see
`limit_shm_spin`):

1. A load probe on the engine core. vLLM's stat loggers only hear from the
   scheduler when it steps, and an idle engine does not step: the counts of
   the last step before an abort (one waiting request, blocks in use) would
   stand for as long as the engine stays idle and mislead the router and the
   leak checks. `pdserve_load` (an engine-core utility, called by the
   worker's heartbeat) answers the scheduler's counts as they are now.

2. Seeded sampling with a prompt prefilled in several chunks. After a step that
   computed only part of a prompt, vLLM's model runner throws the token it
   sampled away and rewinds the request's generator with `set_offset()` so that
   the seed yields the same tokens however the prompt was chunked. CPU
   generators (a Mersenne twister) have no offset: the rewind raises
   `RuntimeError: CPU Generator does not use offset` and kills the engine core
   for every request. We keep the same promise on CPU by other means: the state
   of each such generator is saved before sampling and restored after it, and
   the rewind never sees those generators.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_pdserve_generator_fix"


def register() -> None:
    """Entry point (`vllm.general_plugins`); safe to call more than once per process."""
    from vllm.platforms import current_platform

    from pdserve.worker.migration import add_migration_utilities, patch_generator_steps

    add_load_probe()
    add_migration_utilities()  # live migration out of a decode instance (worker.migration)
    if current_platform.is_cpu():
        patch_cpu_model_runner()
        patch_generator_steps()
        limit_shm_spin()


LOAD_PROBE = "pdserve_load"


def _load(self: Any) -> tuple[int, int, float, list[str]]:
    """(running, waiting, KV usage, ids queued or running) of the scheduler now; runs in the engine core
    between steps. The ids let the worker find requests nobody reads (`worker.orphans`)."""
    scheduler = self.scheduler
    running, waiting = scheduler.get_request_counts()
    ids = [r.request_id for r in scheduler.running]
    for queue in (scheduler.waiting, getattr(scheduler, "kv_holding_waiting", ())):
        ids.extend(r.request_id for r in queue)
    return running, waiting, float(scheduler.get_kv_cache_usage()), ids


def add_load_probe() -> None:
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, LOAD_PROBE):
        setattr(EngineCore, LOAD_PROBE, _load)


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    """Batch index -> generator of the requests whose sample this step throws away."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    if not batch.generators or num_reqs == 0:
        return {}
    discard = runner.discard_request_mask.np[:num_reqs]
    return {i: g for i, g in batch.generators.items()
            if i < num_reqs and discard[i] and g.device.type == "cpu"}


def patch_cpu_model_runner() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, _PATCHED, False):
        return
    sample, bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync

    def _sample(self, *args: Any, **kwargs: Any) -> Any:
        saved = {i: g.get_state() for i, g in _discarded_cpu_generators(self).items()}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in saved.items():
                self.input_batch.generators[i].set_state(state)

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        # Restored already in _sample: hide them from the offset rewind.
        hidden = _discarded_cpu_generators(self)
        generators = self.input_batch.generators
        for i in hidden:
            del generators[i]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    CPUModelRunner._sample = _sample
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    setattr(CPUModelRunner, _PATCHED, True)
    log.debug("pdserve: CPU generator rewind replaced by state save/restore")


SPIN_ENV = "PDSERVE_SHM_SPIN_S"
_SPIN_PATCHED = "_pdserve_spin_limit"


def limit_shm_spin() -> None:
    """How long vLLM's shared-memory queue readers spin after a read before they sleep in a poll.

    The engine core waits for its worker's step result, and the worker for the next step, on a
    shared-memory queue whose reader busy-loops with `sched_yield()` for 1 s after each read. On a
    GPU node that spin has a spare core to itself. On a CPU node with an instance per core and no
    core left over it does not: an engine core and an idle instance's worker spinning took ~70 % of
    this 2-core machine while one request decoded, and the gateway and the engine actors (which
    carry every token to the client) stalled for 100-700 ms at a time. The instance factory sets the
    spin (`pools.shm_spin_s`) in an engine's environment where the core plan leaves the front end no
    core; unset keeps vLLM's own.
    """
    import os

    value = os.environ.get(SPIN_ENV)
    if value is None:
        return
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    if getattr(cls, _SPIN_PATCHED, False):
        return
    spin_s = float(value)
    init = cls.__init__

    def __init__(self: Any, is_reader: bool, *args: Any, **kwargs: Any) -> None:
        init(self, is_reader, *args, **kwargs)
        if is_reader:
            self.busy_loop_s = spin_s

    cls.__init__ = __init__
    setattr(cls, _SPIN_PATCHED, True)
