"""pdserve's vLLM general plugin: fixes vLLM-CPU needs before any request runs.

vLLM loads every `vllm.general_plugins` entry point in each of its processes
(the front end, the engine core, the workers); ours is registered in
pyproject.toml and does one thing today:

Seeded sampling with a prompt prefilled in several chunks. After a step that
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

    if current_platform.is_cpu():
        patch_cpu_model_runner()


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
