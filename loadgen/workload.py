"""The workload: each request's prompt and output length, and when it is sent.

Lengths come from a trace (in trace order) or from a synthetic distribution;
send times from the trace's own timestamps, a Poisson or gamma process, or
nothing (a closed loop sends when a slot frees).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pdserve.loadgen import arrivals
from pdserve.loadgen.config import BenchConfig, WorkloadConfig
from pdserve.loadgen.errors import BenchConfigError
from pdserve.loadgen.traces import Trace


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    input_tokens: int
    output_tokens: int
    send_at_s: float | None  # None in a closed loop
    clipped: bool = False  # a length was cut to --max-input-tokens / --max-output-tokens


def trace_window(trace: Trace, start_s: float) -> Trace:
    """The part of a trace from start_s on, re-based so that it starts at 0."""
    keep = [i for i, t in enumerate(trace.arrivals_s) if t >= start_s]
    if not keep:
        raise BenchConfigError(f"--trace-start {start_s:g} s is past the end of the trace ({trace.span_s:.0f} s)")
    t0 = trace.arrivals_s[keep[0]]
    return Trace(name=trace.name, arrivals_s=tuple(trace.arrivals_s[i] - t0 for i in keep),
                 context_tokens=tuple(trace.context_tokens[i] for i in keep),
                 generated_tokens=tuple(trace.generated_tokens[i] for i in keep))


def _synthetic(mean: int, cfg: WorkloadConfig, rng: np.random.Generator) -> int:
    if cfg.length_dist == "fixed":
        value = float(mean)
    elif cfg.length_dist == "uniform":
        value = rng.uniform(mean * (1 - cfg.length_spread), mean * (1 + cfg.length_spread))
    elif cfg.length_dist == "exponential":
        value = rng.exponential(mean)
    else:  # lognormal with the requested mean: mu = ln(mean) - sigma^2 / 2
        sigma = cfg.length_spread
        value = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma)
    return max(1, int(round(value)))


def lengths(cfg: WorkloadConfig, trace: Trace | None, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """(input, output) lengths: the trace's rows in order (cycled), or synthetic draws forever."""
    if trace is not None:
        yield from itertools.cycle(zip(trace.context_tokens, trace.generated_tokens))
    while True:
        yield _synthetic(cfg.input_len, cfg, rng), _synthetic(cfg.output_len, cfg, rng)


def _clip(cfg: WorkloadConfig, n_in: int, n_out: int) -> tuple[int, int, bool]:
    c_in = min(n_in, cfg.max_input_tokens) if cfg.max_input_tokens else n_in
    c_out = min(n_out, cfg.max_output_tokens) if cfg.max_output_tokens else n_out
    return c_in, c_out, (c_in, c_out) != (n_in, n_out)


def send_times(config: BenchConfig, trace: Trace | None, rng: np.random.Generator) -> list[float]:
    a, s = config.arrivals, config.stop
    if a.kind == "trace":
        assert trace is not None
        return arrivals.from_trace(trace.arrivals_s, a.rate, s.duration_s, s.num_requests)
    assert a.rate is not None
    burstiness = 1.0 if a.kind == "poisson" else a.burstiness
    return arrivals.gamma(a.rate, burstiness, rng, s.duration_s, s.num_requests)


def plan_open_loop(config: BenchConfig, trace: Trace | None) -> list[PlannedRequest]:
    rng = np.random.default_rng(config.workload.seed)
    times = send_times(config, trace, rng)
    if config.arrivals.kind == "trace" and trace is not None and len(times) > len(trace):
        times = times[: len(trace)]
    out = []
    for i, (t, (n_in, n_out)) in enumerate(zip(times, lengths(config.workload, trace, rng))):
        c_in, c_out, clipped = _clip(config.workload, n_in, n_out)
        out.append(PlannedRequest(index=i, input_tokens=c_in, output_tokens=c_out, send_at_s=t, clipped=clipped))
    return out


def closed_loop_lengths(config: BenchConfig, trace: Trace | None) -> Iterator[PlannedRequest]:
    rng = np.random.default_rng(config.workload.seed)
    for i, (n_in, n_out) in enumerate(lengths(config.workload, trace, rng)):
        c_in, c_out, clipped = _clip(config.workload, n_in, n_out)
        yield PlannedRequest(index=i, input_tokens=c_in, output_tokens=c_out, send_at_s=None, clipped=clipped)


def probe_lengths(config: BenchConfig, trace: Trace | None, n: int = 256) -> tuple[int, int]:
    """Median lengths of the workload: the unloaded-latency probes use these."""
    sample = list(itertools.islice(closed_loop_lengths(config, trace), n))
    return (int(np.median([p.input_tokens for p in sample])), int(np.median([p.output_tokens for p in sample])))
