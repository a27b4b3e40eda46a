"""Measuring an engine into a profile CSV (Splitwise's format), engine-agnostic.

The measurement talks to the engine through one callable,
`generate(prompts: list[list[int]], max_tokens) -> seconds`, which runs the
prompts as one batch to completion; `pdserve profile` passes one backed by
vLLM's offline `LLM`, and tests pass a fake. From it:

- prompt_time(p, b): `generate(b prompts of p tokens, max_tokens=1)`: one
  prefill step (plus one sampling, which is what a first token costs anyway);
- token_time(p, b): `(generate(.., max_tokens=T) - prompt_time) / (T - 1)`:
  the mean decode step of a batch of b while contexts grow from p to p + T.

Rows are written for batch 1 over prompt sizes (prefill vs length, and the
context effect on decode steps) and for one reference prompt size over batch
sizes (decode vs batch), which is what `perf_model.build_model` reads.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pdserve.planner.errors import SpecError
from pdserve.planner.perf_model import COLUMNS

Generate = Callable[[list[list[int]], int], float]


@dataclass
class ProfilePlan:
    prompt_sizes: list[int] = field(default_factory=lambda: [16, 64, 128, 256, 512, 1024])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    ref_prompt: int = 128  # prompt size of the batch sweep
    decode_tokens: int = 32  # T: output tokens when measuring decode steps
    repeats: int = 3
    vocab_size: int = 32000

    def check(self) -> None:
        if self.decode_tokens < 2:
            raise SpecError("decode tokens must be at least 2 (one step beyond the first token)")
        if min(self.prompt_sizes + self.batch_sizes + [self.ref_prompt, self.repeats]) < 1:
            raise SpecError("prompt sizes, batch sizes, reference prompt and repeats must be positive")


class Profiler:
    """Runs a ProfilePlan against `generate` and collects rows."""

    def __init__(self, generate: Generate, plan: ProfilePlan, model: str, hardware: str, tensor_parallel: int = 1,
                 seed: int = 0, log: Callable[[str], None] = print) -> None:
        plan.check()
        self.generate, self.plan, self.log = generate, plan, log
        self.model, self.hardware, self.tp = model, hardware, tensor_parallel
        self.rng = random.Random(seed)
        self.rows: list[dict] = []

    def _prompts(self, size: int, batch: int) -> list[list[int]]:
        # random ids: no two prompts share a prefix, so prefix caching cannot shortcut a prefill
        top = self.plan.vocab_size - 1
        return [[self.rng.randint(10, top) for _ in range(size)] for _ in range(batch)]

    def _point(self, size: int, batch: int) -> None:
        T = self.plan.decode_tokens
        for _ in range(self.plan.repeats):
            prompt_s = self.generate(self._prompts(size, batch), 1)
            total_s = self.generate(self._prompts(size, batch), T)
            token_s = max(total_s - prompt_s, 0.0) / (T - 1)
            self.rows.append({
                "model": self.model, "hardware": self.hardware, "prompt_size": size, "batch_size": batch,
                "token_size": T, "peak_power": "", "average_power": "", "prompt_time": prompt_s * 1000,
                "token_time": token_s * 1000, "e2e_time": total_s * 1000, "tensor_parallel": self.tp})
        last = self.rows[-1]
        self.log(f"  prompt {size:>5} x batch {batch:>3}: prefill {last['prompt_time']:8.2f} ms, "
                 f"decode step {last['token_time']:7.2f} ms")

    def run(self) -> list[dict]:
        self.generate(self._prompts(min(self.plan.prompt_sizes), 1), 4)  # warm-up: first calls pay set-up
        for size in self.plan.prompt_sizes:
            self._point(size, 1)
        for batch in self.plan.batch_sizes:
            if batch == 1 and self.plan.ref_prompt in self.plan.prompt_sizes:
                continue  # measured above
            self._point(self.plan.ref_prompt, batch)
        return self.rows


def write_profile(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
