"""Latency SLOs and whether a simulated run meets them.

An SLO is `METRIC_pNN=LIMIT`: METRIC is ttft, tpot or e2e; LIMIT is either
absolute (`250ms`, `2s`) or a slowdown (`3x`) against the same request run
alone on a reference machine, which is how Splitwise states its SLOs
(TTFT P50/P90/P99 2x/3x/6x; TBT and E2E 1.25x/1.5x/5x). TPOT (mean time per
output token of a request) stands in for Splitwise's TBT: the simulator's
decode runs have equal steps, so per-token gaps equal the mean except for
the step a prefill interrupts.

A rejected request counts as an infinite latency: it violates every SLO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from pdserve.planner.errors import SpecError
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import SimResult

_SLO = re.compile(r"^(ttft|tpot|tbt|e2e)_p(\d+(?:\.\d+)?)=(\d+(?:\.\d+)?)(x|ms|s)$")


class Slo(BaseModel):
    metric: str = Field(description="ttft, tpot or e2e.")
    percentile: float = Field(description="Which percentile of requests must meet the limit, 0-100.")
    limit: float = Field(description="Seconds, or a slowdown factor when `relative`.")
    relative: bool = Field(description="True: `limit` is a slowdown against the request run alone.")

    def __str__(self) -> str:
        unit = "x" if self.relative else "s"
        return f"{self.metric}_p{self.percentile:g}={self.limit:g}{unit}"


def parse_slo(text: str) -> Slo:
    m = _SLO.match(text.strip().lower())
    if not m:
        raise SpecError(f"bad SLO {text!r}: expected METRIC_pNN=LIMIT with METRIC in ttft/tpot/e2e and "
                        "LIMIT like 3x, 250ms or 2s")
    metric, pct, value, unit = m.groups()
    limit = float(value) / 1000 if unit == "ms" else float(value)
    if not 0 < float(pct) <= 100:
        raise SpecError(f"bad percentile in {text!r}")
    return Slo(metric="tpot" if metric == "tbt" else metric, percentile=float(pct), limit=limit,
               relative=unit == "x")


SPLITWISE_SLOS = tuple(parse_slo(s) for s in (
    "ttft_p50=2x", "ttft_p90=3x", "ttft_p99=6x",
    "tpot_p50=1.25x", "tpot_p90=1.5x", "tpot_p99=5x",
    "e2e_p50=1.25x", "e2e_p90=1.5x", "e2e_p99=5x"))


@dataclass
class SloReport:
    ok: bool
    values: dict  # str(slo) -> measured percentile (seconds or slowdown)
    rejected: int
    worst: str  # the SLO with the least headroom (value / limit)


class SloChecker:
    """Evaluates runs against SLOs; `reference` is the machine whose solo run defines a 1x slowdown."""

    def __init__(self, slos: tuple[Slo, ...] | list[Slo], reference: PerfModel | None = None) -> None:
        if any(s.relative for s in slos) and reference is None:
            raise SpecError("relative SLOs (like 3x) need a reference machine's performance model")
        self.slos, self.ref = tuple(slos), reference
        # The last request set's solo times; the set itself is kept, so that its identity cannot be
        # reused by a later array (an id() key could name a freed array's successor: stale lengths).
        self._alone_for: np.ndarray | None = None
        self._alone_times: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _alone(self, res: SimResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._alone_for is not res.prompt or self._alone_times is None:  # traces are reused across runs
            prefill = np.array([self.ref.prefill_time(int(p)) for p in res.prompt])
            ctx = res.prompt + res.output / 2
            step = np.array([self.ref.decode_step_time(1, float(c)) for c in ctx])
            self._alone_for, self._alone_times = res.prompt, (prefill, step, prefill + (res.output - 1) * step)
        return self._alone_times

    def check(self, res: SimResult) -> SloReport:
        measured = {"ttft": res.ttft, "tpot": res.tpot, "e2e": res.e2e}
        alone = dict(zip(("ttft", "tpot", "e2e"), self._alone(res))) if self.ref is not None else {}
        values, ok, worst, worst_ratio = {}, True, "", -1.0
        for slo in self.slos:
            x = measured[slo.metric] / alone[slo.metric] if slo.relative else measured[slo.metric].copy()
            x = np.where(res.finished, x, np.inf)  # rejected: violates every SLO
            if slo.metric == "tpot":
                x = x[res.output > 1]
            v = float(np.percentile(x, slo.percentile, method="inverted_cdf")) if len(x) else 0.0
            values[str(slo)] = v
            ratio = v / slo.limit
            if ratio > worst_ratio:
                worst, worst_ratio = str(slo), ratio
            ok &= v <= slo.limit
        return SloReport(ok, values, res.num_rejected, worst)
