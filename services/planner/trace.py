"""Traces for the simulator: arrival times and token counts, as numpy arrays.

Loading (Azure `code`/`conv` or a user's CSV of TIMESTAMP,ContextTokens,
GeneratedTokens; checksums; download) is `pdserve.loadgen.traces`'s job;
this module only adds the array view the simulator needs and rescaling to a
target rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdserve.planner.errors import TraceError


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival; `arrival` in seconds from the first request."""

    name: str
    arrival: np.ndarray  # float64 seconds
    prompt: np.ndarray  # int64 tokens
    output: np.ndarray  # int64 tokens generated (>= 1)

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def duration(self) -> float:
        return float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0

    @property
    def rate(self) -> float:
        return (len(self) - 1) / self.duration if self.duration > 0 else float("inf")

    def at_rate(self, rate: float) -> "Trace":
        """Same requests and order, inter-arrival gaps scaled so the mean rate is `rate` req/s."""
        if rate <= 0:
            raise TraceError(f"rate must be positive, got {rate}")
        scale = self.rate / rate if np.isfinite(self.rate) else 1.0
        return Trace(self.name, (self.arrival - self.arrival[0]) * scale, self.prompt, self.output)

    def poisson(self, rate: float, seed: int = 0) -> "Trace":
        """Same requests and order, arriving as a Poisson process at `rate` req/s (Splitwise's simulator's traces)."""
        if rate <= 0:
            raise TraceError(f"rate must be positive, got {rate}")
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(self))
        gaps[0] = 0.0
        return Trace(self.name, np.cumsum(gaps), self.prompt, self.output)

    def sample(self, n: int | None) -> "Trace":
        """About `n` requests spread over the whole trace (every k-th), keeping its mix and its bursts.

        A prefix would not do: the Azure traces' first minutes are lighter than the hour.
        """
        if n is None or n >= len(self):
            return self
        k = -(-len(self) // n)
        return Trace(self.name, self.arrival[::k], self.prompt[::k], self.output[::k])


    def matched_window(self, n: int | None, candidates: int = 400) -> "Trace":
        """The `n` consecutive requests whose load is most like the whole trace's.

        At one request rate, a window offers the trace's load when its mean
        prompt and output lengths are the trace's; its burstiness (the
        coefficient of variation of its gaps) should be the trace's too, or
        rescaling it to a rate would flatter (or punish) a design. Of about
        `candidates` evenly spaced windows, the one closest on all three.
        """
        if n is None or n >= len(self):
            return self
        gaps = np.diff(self.arrival)
        cs = {k: np.concatenate([[0.0], np.cumsum(v)]) for k, v in
              (("p", self.prompt.astype(float)), ("o", self.output.astype(float)), ("g", gaps), ("g2", gaps**2))}
        starts = np.unique(np.linspace(0, len(self) - n, candidates).astype(int))
        mean = {k: (cs[k][starts + n] - cs[k][starts]) / n for k in ("p", "o")}
        g = (cs["g"][starts + n - 1] - cs["g"][starts]) / (n - 1)
        g2 = (cs["g2"][starts + n - 1] - cs["g2"][starts]) / (n - 1)
        cv = np.sqrt(np.maximum(g2 - g**2, 0.0)) / np.maximum(g, 1e-12)
        whole_cv = float(np.std(gaps) / max(np.mean(gaps), 1e-12))
        score = (np.abs(mean["p"] / self.prompt.mean() - 1) + np.abs(mean["o"] / self.output.mean() - 1)
                 + np.abs(cv / max(whole_cv, 1e-12) - 1))
        i = int(starts[int(np.argmin(score))])
        return Trace(self.name, self.arrival[i:i + n] - self.arrival[i], self.prompt[i:i + n], self.output[i:i + n])


def from_loadgen(trace) -> Trace:
    """The planner's numpy view of a `pdserve.loadgen.traces.Trace` (one loader for the project)."""
    return Trace(trace.name, np.asarray(trace.arrivals_s, dtype=np.float64),
                 np.maximum(np.asarray(trace.context_tokens, dtype=np.int64), 1),
                 np.maximum(np.asarray(trace.generated_tokens, dtype=np.int64), 1))


def shared_trace_dir() -> Path | None:
    """`../shared/traces` beside the checkout, where this project keeps its copy of the Azure traces."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
    return path if path.is_dir() else None


def load_source(spec: str):
    """`code`, `conv` or a CSV path as loadgen's trace, through its loader (sha256-checked; downloads when missing).

    Named traces are looked for in $PDSERVE_TRACE_DIR if set, else ../shared/traces; then the user cache.
    """
    from pdserve.loadgen.errors import LoadgenError
    from pdserve.loadgen.traces import load

    try:
        trace_dir = None if os.environ.get("PDSERVE_TRACE_DIR") else shared_trace_dir()
        return load(spec, trace_dir=trace_dir)
    except LoadgenError as exc:
        raise TraceError(str(exc)) from None


def load_trace(spec: str) -> Trace:
    """The planner's view of `load_source(spec)`."""
    return from_loadgen(load_source(spec))
