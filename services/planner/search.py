"""Cluster designs and the search over them.

A design is a pool of prompt machines and a pool of token machines (Splitwise)
or one pool of colocated machines (the baselines). A family fixes the machine
types — Baseline-A100, Baseline-H100, Splitwise-AA, -HH, -HA (H100 prompts,
A100 tokens), -HHcap (power-capped H100 tokens) — and the search picks the
pool sizes:

- throughput at a budget (iso-power, iso-cost): for each family, the split of
  the budget between the pools with the highest sustainable request rate;
- cost (or power) at a throughput: for each family, the cheapest (or least
  power-hungry) pools that sustain the target rate.

"Sustainable" means the simulated run meets every SLO. The rate search
rescales the trace's arrival gaps (same requests, same order) and bisects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from pdserve.planner.errors import SpecError
from pdserve.planner.hardware import MachineType, ModelSpec, decode_limits
from pdserve.planner.perf_model import ProfileSet
from pdserve.planner.simulator import InstanceSpec, SimConfig, Simulator
from pdserve.planner.slo import SloChecker, SloReport
from pdserve.planner.trace import Trace
from pdserve.router.policy import PlacementPolicy
from pdserve.shared.roles import Role

_LETTER = {"a100": "A", "h100": "H", "h100cap": "Hcap"}
PAPER_FAMILIES = ("a100", "h100", "a100/a100", "h100/h100", "h100/a100", "h100/h100cap")


@dataclass(frozen=True)
class Family:
    """Machine types of a design: colocated (`token` is None) or split prompt/token pools."""

    prompt: str
    token: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Family":
        prompt, _, token = text.partition("/")
        return cls(prompt, token or None)

    @property
    def split(self) -> bool:
        return self.token is not None

    @property
    def name(self) -> str:
        if not self.split:
            return f"Baseline-{self.prompt.upper()}"
        return "Splitwise-" + _LETTER.get(self.prompt, self.prompt) + _LETTER.get(self.token, self.token)


@dataclass(frozen=True)
class Design:
    family: Family
    prompt_count: int
    token_count: int = 0

    def label(self) -> str:
        if not self.family.split:
            return f"{self.family.name} {self.prompt_count}"
        return f"{self.family.name} {self.prompt_count}P+{self.token_count}T"

    def machines(self) -> list[tuple[str, int]]:
        if not self.family.split:
            return [(self.family.prompt, self.prompt_count)]
        return [(self.family.prompt, self.prompt_count), (self.family.token, self.token_count)]


@dataclass
class Evaluation:
    design: Design
    rate: float  # req/s: the rate tested, or the highest sustainable one
    ok: bool
    cost_per_hour: float
    power_kw: float
    report: SloReport | None = None
    probes: list = field(default_factory=list)  # (rate, ok) tried
    full_trace_rate: float | None = None  # the rate re-searched on the whole trace (best designs only)
    full_trace_ok: bool | None = None  # whether the design sustains the target rate on the whole trace
    grown_from: str | None = None  # the search's design, when the whole-trace check had to grow it


class Planner:
    """Evaluates designs on one trace window with one policy, SLO set and machine catalogue."""

    def __init__(self, trace: Trace, profiles: ProfileSet, model: ModelSpec, machines: dict[str, MachineType],
                 checker: SloChecker, policy_factory: Callable[[], PlacementPolicy], config: SimConfig,
                 window: int | None = None, rate_tolerance: float = 0.03, arrivals: str = "trace",
                 seed: int = 0, search: str = "matched") -> None:
        if arrivals not in ("trace", "poisson"):
            raise SpecError(f"arrivals must be 'trace' or 'poisson', not {arrivals!r}")
        if search not in ("matched", "legacy"):
            raise SpecError(f"search must be 'matched' or 'legacy', not {search!r}")
        self.trace, self.profiles, self.model, self.machines = trace, profiles, model, machines
        self.checker, self.policy_factory, self.cfg = checker, policy_factory, config
        self.window, self.tol, self.arrivals = window, rate_tolerance, arrivals
        self.seed, self.search = seed, search
        self._windows: dict[int | None, Trace] = {}
        self.simulations = 0
        self.simulated_requests = 0
        self.sim_wall_s = 0.0

    def machine(self, name: str) -> MachineType:
        if name not in self.machines:
            raise SpecError(f"unknown machine {name!r}; known: {sorted(self.machines)}")
        return self.machines[name]

    def cost(self, design: Design) -> float:
        return sum(self.machine(m).cost_per_hour * n for m, n in design.machines())

    def power(self, design: Design) -> float:
        return sum(self.machine(m).power_kw * n for m, n in design.machines())

    def perf(self, name: str):
        """The performance model of one instance on machine `name`, bounded by its peaks."""
        m = self.machine(name)
        return self.profiles.get(self.model.name, m.profile_hardware, m.tensor_parallel, decode_limits(self.model, m))

    def instances(self, design: Design) -> list[InstanceSpec]:
        pools = ([(design.family.prompt, Role.MIXED, design.prompt_count)] if not design.family.split else
                 [(design.family.prompt, Role.PREFILL, design.prompt_count),
                  (design.family.token, Role.DECODE, design.token_count)])
        out = []
        for name, role, count in pools:
            m = self.machine(name)
            perf = self.perf(name)
            kv = self.model.kv_tokens(m)
            out += [InstanceSpec(f"{role.value}-{name}-{i}", role, name, perf, kv) for i in range(count)]
        return out

    def window_trace(self) -> Trace:
        """The requests a search simulation replays (legacy: every k-th; matched: a load-matched window)."""
        if self.window not in self._windows:
            pick = self.trace.sample if self.search == "legacy" else self.trace.matched_window
            self._windows[self.window] = pick(self.window)
        return self._windows[self.window]

    def run(self, design: Design, rate: float) -> SloReport:
        sample = self.window_trace()
        trace = sample.at_rate(rate) if self.arrivals == "trace" else sample.poisson(rate, self.seed)
        res = Simulator(self.instances(design), self.policy_factory(), self.cfg).run(trace)
        self.simulations += 1
        self.simulated_requests += len(trace)
        self.sim_wall_s += res.wall_s
        return self.checker.check(res)

    def validate(self, e: Evaluation, at_rate: bool, max_growth: int = 10) -> None:
        """Re-check a search result on the whole trace, not the window the search used.

        At a budget: re-search the design's rate. At a rate: the smallest
        proportional scaling of both pools that holds on the whole trace,
        bracketed by 10% steps and bisected (legacy: grow by 10% steps until
        it holds, never shrink).
        """
        window, self.window = self.window, None
        try:
            if not at_rate:
                e.full_trace_rate = self.max_rate(e.design, e.rate, step=1.1).rate
                return
            if self.search != "legacy":
                self._grow_by_bisection(e, max_growth)  # may also shrink it
                return
            for _ in range(max_growth):
                e.full_trace_ok = self.run(e.design, e.rate).ok
                if e.full_trace_ok:
                    return
                d = e.design
                e.grown_from = e.grown_from or d.label()
                e.design = Design(d.family, math.ceil(d.prompt_count * 1.1),
                                  math.ceil(d.token_count * 1.1) if d.family.split else 0)
                e.cost_per_hour, e.power_kw = self.cost(e.design), self.power(e.design)
        finally:
            self.window = window

    def _grow_by_bisection(self, e: Evaluation, max_steps: int) -> None:
        """The smallest proportional scaling of the design that holds on the whole trace.

        Bracket by 10% steps (up while it fails; down while it holds, since the
        window can be harsher than the whole trace too), then bisect the last step.
        """
        base, held = e.design, {}

        def scaled(s: float) -> Design | None:
            d = Design(base.family, math.ceil(base.prompt_count * s - 1e-9),
                       math.ceil(base.token_count * s - 1e-9) if base.family.split else 0)
            return None if d.prompt_count < 1 or (d.family.split and d.token_count < 1) else d

        def ok(s: float) -> bool:
            d = scaled(s)
            if d is not None and d not in held:
                held[d] = self.run(d, e.rate).ok
            return d is not None and held[d]

        if ok(1.0):
            lo, hi = 0.0, 1.0
            for k in range(1, max_steps + 1):
                if not ok(1.1 ** -k):
                    lo = 1.1 ** -k
                    break
                hi = 1.1 ** -k
        else:
            lo, hi = 1.0, None
            for k in range(1, max_steps + 1):
                if ok(1.1 ** k):
                    hi = 1.1 ** k
                    break
                lo = 1.1 ** k
            if hi is None:
                e.full_trace_ok = False
                return
        while hi - lo > 1e-3 and scaled(lo) != scaled(hi):  # bisect; sizes are whole machines
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        e.full_trace_ok = True
        best = self._trim(scaled(hi), e.rate, held)
        if best != base:
            e.grown_from, e.design = base.label(), best
            e.cost_per_hour, e.power_kw = self.cost(e.design), self.power(e.design)

    def _trim(self, design: Design, rate: float, held: dict) -> Design:
        """Each pool alone down to the fewest machines that still hold (scaling both rounds small pools up)."""
        if not design.family.split:
            return design
        for pool in ("token_count", "prompt_count"):
            lo, hi = 0, getattr(design, pool)  # with the other pool as it is, nothing below is known to fail
            while hi - lo > 1:
                mid = (lo + hi) // 2
                d = Design(design.family, **{**{"prompt_count": design.prompt_count,
                                                "token_count": design.token_count}, pool: mid})
                if d not in held:
                    held[d] = self.run(d, rate).ok
                lo, hi = (lo, mid) if held[d] else (mid, hi)
            design = Design(design.family, **{**{"prompt_count": design.prompt_count,
                                                 "token_count": design.token_count}, pool: hi})
        return design

    def evaluate(self, design: Design, rate: float) -> Evaluation:
        report = self.run(design, rate)
        return Evaluation(design, rate, report.ok, self.cost(design), self.power(design), report, [(rate, report.ok)])

    def max_rate(self, design: Design, guess: float, step: float = 2.0) -> Evaluation:
        """Highest rate meeting the SLOs, to within `rate_tolerance` (0 if even guess/1000 fails)."""
        probes: list[tuple[float, bool]] = []
        reports: dict[float, SloReport] = {}

        def ok(rate: float) -> bool:
            reports[rate] = self.run(design, rate)
            probes.append((rate, reports[rate].ok))
            return probes[-1][1]

        lo, hi = None, None
        rate = guess
        for _ in range(40):  # bracket: walk by `step` until the outcome flips
            if ok(rate):
                lo, rate = rate, rate * step
            else:
                hi, rate = rate, rate / step
            if lo is not None and hi is not None:
                break
        if lo is None:
            lo = 0.0
        elif hi is not None:
            while hi / lo > 1 + self.tol:
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        report = reports.get(lo)
        return Evaluation(design, lo, lo > 0, self.cost(design), self.power(design), report, probes)

    def rate_guess(self, design: Design) -> float:
        """A starting rate: the prompt pool's prefill throughput at full batches, in requests."""
        perf = self.perf(design.family.prompt)
        tokens = self.cfg.max_prefill_tokens
        per_machine = tokens / perf.prefill_time(tokens) / max(float(self.trace.prompt.mean()), 1.0)
        share = 1.0 if design.family.split else 0.5  # colocated machines also decode
        return max(per_machine * design.prompt_count * share * 0.5, 1e-3)


def budget_designs(family: Family, planner: Planner, budget: float, per: Callable[[MachineType], float],
                   min_count: int = 1) -> list[Design]:
    """Every design of `family` that spends as much of `budget` as whole machines allow."""
    p = per(planner.machine(family.prompt))
    if not family.split:
        n = int(budget / p + 1e-9)  # not //: 275.4 // 10.2 is 26.0, one machine short
        return [Design(family, n)] if n >= min_count else []
    t = per(planner.machine(family.token))
    designs = []
    for n_p in range(min_count, int(budget / p + 1e-9) + 1):
        n_t = int((budget - n_p * p) / t + 1e-9)
        if n_t >= min_count:
            designs.append(Design(family, n_p, n_t))
    return designs


def best_at_budget(family: Family, planner: Planner, budget: float, per: Callable[[MachineType], float],
                   coarse: int = 8) -> tuple[Evaluation | None, list[Evaluation]]:
    """Highest-throughput split of a budget: a coarse sweep over prompt counts, then a local refinement.

    Throughput is unimodal in the split (too few prompt machines starve TTFT,
    too few token machines starve TPOT and KV), which the refinement relies on.
    """
    designs = budget_designs(family, planner, budget, per)
    if not designs:
        return None, []
    seen: dict[int, Evaluation] = {}

    def score(i: int) -> float:
        if i not in seen:
            d = designs[i]
            guess = max((e.rate for e in seen.values()), default=planner.rate_guess(d)) or planner.rate_guess(d)
            seen[i] = planner.max_rate(d, guess)
        return seen[i].rate

    step = max(1, len(designs) // coarse)
    for i in range(step // 2, len(designs), step):
        score(i)
    best = max(seen, key=score)
    while step > 1:
        step = max(1, step // 2)
        for i in (best - step, best + step):
            if 0 <= i < len(designs):
                score(i)
        best = max(seen, key=score)
    evals = sorted(seen.values(), key=lambda e: e.design.prompt_count)
    return seen[best], evals


def min_count_at_rate(planner: Planner, make: Callable[[int], Design], rate: float, upper: int,
                      max_upper: int | None = None) -> int | None:
    """Smallest n with make(n) sustaining `rate` (feasibility is monotone in n).

    Tries `upper` first and doubles it up to `max_upper` (default 8 x upper) if
    even that is too few; None if nothing up to there suffices.
    """
    max_upper = max_upper or 8 * upper
    lo = 0  # known infeasible (no machines)
    while not planner.run(make(upper), rate).ok:
        if upper >= max_upper:
            return None
        lo, upper = upper, min(2 * upper, max_upper)
    hi = upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if planner.run(make(mid), rate).ok else (mid, hi)
    return hi


def cheapest_at_rate(family: Family, planner: Planner, rate: float, upper: int,
                     objectives: dict[str, Callable[[Design], float]], coarse: int = 8) -> tuple[dict, list]:
    """The feasible frontier of a family at `rate`, and its minimum under each objective (cost, power).

    Colocated: the fewest machines. Split: for a sweep of prompt-pool sizes,
    the fewest token machines that suffice, refined around each objective's
    best point; the objectives share the simulations of the frontier.
    """
    if not family.split:
        n = min_count_at_rate(planner, lambda k: Design(family, k), rate, upper)
        if n is None:
            return {name: None for name in objectives}, []
        e = planner.evaluate(Design(family, n), rate)
        return {name: e for name in objectives}, [e]
    points: dict[int, Evaluation | None] = {}

    def point(n_p: int) -> Evaluation | None:
        if n_p not in points:
            # too few prompt machines fail at any token count: do not double far looking for one
            n_t = min_count_at_rate(planner, lambda k: Design(family, n_p, k), rate, upper, 2 * upper)
            points[n_p] = None if n_t is None else planner.evaluate(Design(family, n_p, n_t), rate)
        return points[n_p]

    def value(n_p: int, objective) -> float:
        e = point(n_p)
        return math.inf if e is None else objective(e.design)

    first = max(1, upper // coarse)
    for n_p in range(max(1, first // 2), upper + 1, first):
        point(n_p)
    best: dict = {}
    for name, objective in objectives.items():
        at = min(points, key=lambda n: value(n, objective))
        step = first
        while step > 1:  # halve the step around this objective's best prompt-pool size
            step = max(1, step // 2)
            for n_p in (at - step, at + step):
                if 1 <= n_p <= upper:
                    point(n_p)
            at = min(points, key=lambda n: value(n, objective))
        best[name] = points[at]
    frontier = sorted((e for e in points.values() if e is not None), key=lambda e: e.design.prompt_count)
    return best, frontier
