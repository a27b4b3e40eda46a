"""The requests of one `pdserve simulate` run: lengths and arrival times, as `pdserve bench` would send them.

Within what a trace holds, the run is exactly `pdserve bench`'s plan for the
same options (`loadgen.workload.plan_open_loop`: the same rows, the same
arrival times for the same seed), so a simulated run and a live one of the
same workload line up request by request. Beyond it:

- Poisson or gamma arrivals that need more requests than the trace has
  (180 req/s for 600 s is 108,000; the conv trace holds 19,366) draw every
  request's (prompt, output) pair from the trace with replacement, so the
  run keeps the trace's length distribution instead of repeating its order;
- trace arrivals that need more requests than the trace has repeat the
  trace's gaps (scaled to the rate) end to end, with lengths drawn the same
  way.

Every random draw comes from `seed` (arrivals: bench's generator; the
resampling: its own stream of the same seed), so a run is reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pdserve.loadgen import traces as lg_traces
from pdserve.loadgen import workload as lg_workload
from pdserve.loadgen.config import (ArrivalConfig, BenchConfig, LengthDist, SloConfig, StopConfig, TargetConfig,
                                    WorkloadConfig)
from pdserve.planner.trace import Trace

SIMULATED_URL = "simulated://pdserve-planner"
_RESAMPLE_STREAM = 14  # a second generator of the same seed: resampling never shifts the arrival draws


class WorkloadSpec(BaseModel):
    """What to simulate: the same knobs as `pdserve bench`'s workload and arrivals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trace: str | None = Field(None, description="'code', 'conv', a CSV path, or None for synthetic lengths.")
    arrival: Literal["trace", "poisson", "gamma"] = Field("trace", description="When requests arrive.")
    rate: float | None = Field(None, gt=0, description="Requests/s (trace arrivals: the trace's gaps rescaled).")
    duration_s: float | None = Field(None, gt=0, description="No arrival after this many seconds.")
    burstiness: float = Field(1.0, gt=0, description="Gamma shape (1: Poisson).")
    seed: int = Field(0, description="Seed of every random draw of the workload.")
    input_len: int = Field(1024, ge=1, description="Synthetic: mean prompt tokens.")
    output_len: int = Field(128, ge=1, description="Synthetic: mean output tokens.")
    length_dist: LengthDist = Field("fixed", description="Synthetic: distribution of both lengths.")
    length_spread: float = Field(0.5, ge=0, description="Synthetic: uniform +- fraction, or lognormal sigma.")


def bench_config(spec: WorkloadSpec, model: str, output_dir: Path, label: str | None,
                 slo: SloConfig, percentiles: list[float], charts: bool) -> BenchConfig:
    """The `pdserve bench` configuration this simulation stands for (it goes into result.json)."""
    return BenchConfig(
        target=TargetConfig(base_url=SIMULATED_URL, model=model),
        workload=WorkloadConfig(trace=spec.trace, input_len=spec.input_len, output_len=spec.output_len,
                                length_dist=spec.length_dist, length_spread=spec.length_spread,
                                tokenizer="none (simulated)", seed=spec.seed),
        arrivals=ArrivalConfig(kind=spec.arrival, rate=spec.rate, burstiness=spec.burstiness),
        stop=StopConfig(duration_s=spec.duration_s), slo=slo, percentiles=percentiles, output_dir=output_dir,
        label=label, progress=False, charts=charts, preflight=False)


def resample(prompt: np.ndarray, output: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` (prompt, output) pairs drawn from the given ones with replacement (pairs kept together)."""
    idx = rng.integers(0, len(prompt), n)
    return np.asarray(prompt)[idx], np.asarray(output)[idx]


def _tiled_trace_times(arrivals_s: tuple[float, ...], rate: float, duration_s: float) -> np.ndarray:
    """The trace's gaps scaled to `rate`, repeated end to end until `duration_s`."""
    gaps = np.diff(np.asarray(arrivals_s)) * (lg_traces.Trace("", arrivals_s, (), ()).mean_rate / rate)
    cycle = np.concatenate([gaps, [1.0 / rate]])  # one mean gap joins a copy to the next
    reps = int(np.ceil(rate * duration_s / len(cycle))) + 1
    times = np.concatenate([[0.0], np.cumsum(np.tile(cycle, reps))])
    return times[times < duration_s]


def build(spec: WorkloadSpec, config: BenchConfig, source: lg_traces.Trace | None) -> tuple[Trace, bool]:
    """The simulated requests, and whether their lengths were resampled."""
    planned = lg_workload.plan_open_loop(config, source)
    times = np.array([p.send_at_s for p in planned], dtype=float)
    prompt = np.array([p.input_tokens for p in planned], dtype=np.int64)
    output = np.array([p.output_tokens for p in planned], dtype=np.int64)
    resampled = False
    if source is not None:
        rng = np.random.default_rng([spec.seed, _RESAMPLE_STREAM])
        if spec.arrival == "trace" and spec.rate and spec.duration_s and spec.rate * spec.duration_s > len(source):
            times = _tiled_trace_times(source.arrivals_s, spec.rate, spec.duration_s)
            prompt, output = resample(source.context_tokens, source.generated_tokens, len(times), rng)
            resampled = True
        elif len(times) > len(source):
            prompt, output = resample(source.context_tokens, source.generated_tokens, len(times), rng)
            resampled = True
    name = source.name if source is not None else "synthetic"
    return Trace(name, times, np.maximum(prompt, 1), np.maximum(output, 1)), resampled
