"""Predicted latencies per instance: prefill, decode step, KV handoff; calibrated online.

One class, `LatencyModel`, used by the SLO-aware policy in the live router and
in the cluster simulator. It starts from a profile's step model (the planner's
`PerfModel`: prefill time from batch prompt tokens, decode step time from batch
size and context tokens) and learns, per instance and phase, a line from the
profile's figure to what happened (`OnlineFit`: actual = a + b * profiled, with
exponential forgetting). A line, not a ratio: a fixed cost (the reservation
round trip before P starts, the event loop between two deltas) would otherwise
make short prompts look 3x slower than long ones. Phases and what feeds them:
  prefill: a placement's TTFT (placement to first token) against the profiled queue + prompt;
  decode:  every gap between two deltas of a decoding request against the profiled step at the
           batch it decoded in (hundreds a second, so the step model is learned, not the request);
  handoff: P's token to D's first against the profiled KV transfer.
Pure: numbers in, numbers out, no clock, no I/O; whoever observes feeds it.

TPOT of a request joining a decode batch is forecast step by step: every member
of a continuous batch makes one token a step, so after k steps the requests with
fewer than k tokens left have gone; new ones join at the instance's recent
placement rate, up to the batch the SLO check lets in (`tpot`). Whether the join
breaks anyone's TPOT is `decode_times` without arrivals: later joins are checked
again when they come (the policy's invariant).

TTFT here is queue + prefill on the instance computing the prompt: pdserve
streams P's token before the KV moves (DESIGN: TTFT never waits for the
handoff), so the handoff is charged to the first token gap, i.e. to TPOT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from pdserve.router.snapshot import InstanceSnapshot, Placement

_SLOPE_MIN, _SLOPE_MAX = 0.05, 20.0  # a correction beyond these is a broken observation, not a slow machine
_FORECAST_CHUNKS = 16  # a TPOT forecast evaluates the step model at most this many times per request
DEMO_PROFILE = Path(__file__).resolve().parents[1] / "planner" / "profiles" / "demo_cpu.csv"


class StepModel(Protocol):
    """What a profile provides (the planner's `PerfModel` is one)."""

    def prefill_time(self, batch_tokens: int) -> float: ...

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float: ...


@dataclass
class OnlineFit:
    """actual ~= a + b * profiled, least squares with forgetting (each observation weighs `weight`).

    With too few observations, or all at one profiled value, a and b are not both knowable:
    then the line goes through the origin (a ratio). a >= 0: a profile is never slower than
    an instance by a fixed negative time. `prior`: that many pseudo-observations on the profile
    itself (actual = profiled, at the first profiled value), forgotten like real ones: the first
    observations move the line part of the way, not all of it.
    """

    weight: float = 0.1
    prior: float = 1.0
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        if self.n == 0 and self.prior > 0:
            self.n, self.sx, self.sy, self.sxx, self.sxy = self.prior, self.prior * x, self.prior * x, \
                self.prior * x * x, self.prior * x * x
        keep = 1.0 - self.weight
        self.n, self.sx, self.sy = keep * self.n + 1.0, keep * self.sx + x, keep * self.sy + y
        self.sxx, self.sxy = keep * self.sxx + x * x, keep * self.sxy + x * y

    def line(self) -> tuple[float, float]:
        if self.n <= 0 or self.sx <= 0:
            return 0.0, 1.0
        n, sx, sy, sxx, sxy = self.n, self.sx, self.sy, self.sxx, self.sxy
        mean_x, mean_y = sx / n, sy / n
        var = sxx / n - mean_x * mean_x
        if self.n >= 3 + self.prior and var > (0.1 * mean_x) ** 2:
            b = (sxy / n - mean_x * mean_y) / var
            b = min(max(b, _SLOPE_MIN), _SLOPE_MAX)
            a = mean_y - b * mean_x
            if a >= 0:
                return a, b
        return 0.0, min(max(sy / sx, _SLOPE_MIN), _SLOPE_MAX)

    def predict(self, x: float) -> float:
        a, b = self.line()
        return a + b * x


@dataclass
class LatencyModel:
    """Predictions for every instance; `by_instance` / `by_hardware` override `default`'s profile."""

    default: StepModel
    by_instance: dict[str, StepModel] = field(default_factory=dict)
    by_hardware: dict[str, StepModel] = field(default_factory=dict)
    kv_bytes_per_token: float = 8192.0
    bandwidth_bps: float = 0.6e9
    handoff_latency_s: float = 0.002
    max_prefill_tokens: int = 2048
    weight: float = 0.2  # of one finished request (prefill, handoff)
    step_weight: float = 0.02  # of one decode gap (there are many)
    prior: float = 1.0  # pseudo-observations on the profile each fit starts with (huge: never calibrate)
    # (instance id, "prefill" | "decode" | "handoff") -> what it learned
    fits: dict[tuple[str, str], OnlineFit] = field(default_factory=dict)

    def base(self, instance: InstanceSnapshot) -> StepModel:
        return self.by_instance.get(instance.instance_id) or self.by_hardware.get(instance.hardware) or self.default

    def calibrated(self, instance_id: str, phase: str, profiled_s: float) -> float:
        fit = self.fits.get((instance_id, phase))
        return profiled_s if fit is None or profiled_s <= 0 else max(fit.predict(profiled_s), 0.0)

    def factor(self, instance_id: str, phase: str) -> float:
        """The learned slope (1: as profiled)."""
        fit = self.fits.get((instance_id, phase))
        return 1.0 if fit is None else fit.line()[1]

    # -- profiled (uncalibrated) figures: what calibration learns against ------------------------
    def profiled_prefill(self, instance: InstanceSnapshot, tokens: int) -> float:
        """`tokens` prompt tokens through `instance`, in iterations of at most `max_prefill_tokens`."""
        if tokens <= 0:
            return 0.0
        base, chunk = self.base(instance), self.max_prefill_tokens
        full, rest = divmod(tokens, chunk)
        return full * base.prefill_time(chunk) + (base.prefill_time(rest) if rest else 0.0)

    def profiled_ttft(self, instance: InstanceSnapshot, prompt_tokens: int) -> float:
        """Queue wait (prompts ahead, not yet prefilled) plus this prompt's prefill.

        A decode batch on the same instance rides along in each prefill iteration (mixed
        batching), so its requests count as tokens of the iteration, as in the simulator.
        """
        riders = instance.num_running if instance.role.runs_decode else 0
        return self.profiled_prefill(instance, instance.outstanding_prefill_tokens + prompt_tokens + riders)

    def profiled_step(self, instance: InstanceSnapshot, batch: int, context_tokens: float | None) -> float:
        return self.base(instance).decode_step_time(max(batch, 1), context_tokens or None)

    def profiled_handoff(self, prompt_tokens: int) -> float:
        return self.handoff_latency_s + prompt_tokens * self.kv_bytes_per_token / self.bandwidth_bps

    # -- predictions ---------------------------------------------------------------------------
    def prefill_time(self, instance: InstanceSnapshot, tokens: int) -> float:
        """Compute time of `tokens` prompt tokens (no queue): the stall they put on a batch decoding there."""
        return self.profiled_prefill(instance, tokens) * self.factor(instance.instance_id, "prefill")

    def ttft(self, instance: InstanceSnapshot, prompt_tokens: int) -> float:
        return self.calibrated(instance.instance_id, "prefill", self.profiled_ttft(instance, prompt_tokens))

    def decode_step(self, instance: InstanceSnapshot, batch: int, context_tokens: float | None) -> float:
        return self.calibrated(instance.instance_id, "decode", self.profiled_step(instance, batch, context_tokens))

    def handoff_time(self, prompt_tokens: int, decode: str = "*") -> float:
        """P's token to D's first: the KV transfer, D's start and first step (learned per decode instance)."""
        return self.calibrated(decode, "handoff", self.profiled_handoff(prompt_tokens))

    def batch_now(self, instance: InstanceSnapshot) -> int:
        """The batch a newcomer joins: what the router routed there and not finished, or the engine's."""
        return max(instance.outstanding, instance.num_running, len(instance.decoding))

    def decode_times(self, instance: InstanceSnapshot, remaining: Sequence[int], join: int = 1,
                     context_tokens: float | None = None) -> list[float]:
        """Seconds until each of `remaining` (tokens left, one per request) is done, with `join` more in the batch.

        No arrivals beyond `join`, departures as the shortest finish (a batch makes a token a step).
        """
        order = sorted(range(len(remaining)), key=lambda i: remaining[i])
        out = [0.0] * len(remaining)
        clock, done, left = 0.0, 0, len(remaining)
        cache: dict[int, float] = {}
        for i in order:
            steps = remaining[i] - done
            if steps > 0:
                batch = left + join
                if batch not in cache:
                    cache[batch] = self.decode_step(instance, batch, context_tokens)
                clock += steps * cache[batch]
                done = remaining[i]
            out[i] = clock
            left -= 1
        return out

    def tpot(self, instance: InstanceSnapshot, prompt_tokens: int, max_tokens: int, handoff_s: float = 0.0,
             start_in_s: float = 0.0, max_batch: int | None = None) -> float:
        """Forecast mean time per output token of a request joining `instance`'s batch (handoff in its first gap).

        Members known one by one (`decoding`) leave as their tokens run out; without that view the
        batch stays as it is. Newcomers join at `decode_rate` (each staying as long as this one),
        up to `max_batch`. Its own decode starts `start_in_s` from now (its TTFT).
        """
        gaps = max(max_tokens - 1, 1)
        context = instance.outstanding_context_tokens + prompt_tokens + max_tokens / 2 \
            if instance.outstanding_context_tokens else None
        others = [d.remaining_tokens for d in instance.decoding]
        fixed = self.batch_now(instance) - len(others)  # counted, not known one by one: assume they stay
        step0 = self.decode_step(instance, self.batch_now(instance) + 1, context)
        skip = int(start_in_s / step0) if step0 > 0 else 0  # tokens the others make before it joins
        others = sorted(r - skip for r in others if r > skip)
        cap = max_batch if max_batch is not None else math.inf
        chunk = max(1, -(-gaps // _FORECAST_CHUNKS))
        clock, k, j = 0.0, 0, 0
        while k < gaps:
            n = min(chunk, gaps - k)
            while j < len(others) and others[j] <= k:
                j += 1
            members = 1 + fixed + len(others) - j
            arrivals = instance.decode_rate * min(clock + start_in_s, gaps * step0)
            step = self.decode_step(instance, members + round(min(arrivals, max(cap - members, 0))), context)
            clock, k = clock + n * step, k + n
        return clock / gaps + handoff_s / gaps

    # -- calibration -------------------------------------------------------------------------
    def observe(self, instance_id: str, phase: str, profiled_s: float, actual_s: float) -> None:
        """One observation: the profile said `profiled_s` (uncalibrated), it took `actual_s`."""
        if profiled_s <= 0 or actual_s <= 0 or not math.isfinite(actual_s) or not math.isfinite(profiled_s):
            return  # nothing to learn (a one-token request, a failed one)
        fit = self.fits.get((instance_id, phase))
        if fit is None:
            fit = self.fits[(instance_id, phase)] = OnlineFit(self.step_weight if phase == "decode" else self.weight,
                                                              self.prior)
        fit.add(profiled_s, actual_s)

    def observe_step(self, instance: InstanceSnapshot, batch: int, context_tokens: float | None,
                     actual_s: float) -> None:
        """A measured decode step (a gap between two deltas) at a known batch and context."""
        self.observe(instance.instance_id, "decode", self.profiled_step(instance, batch, context_tokens), actual_s)

    def observe_handoff(self, decode: str, prompt_tokens: int, actual_s: float) -> None:
        self.observe(decode, "handoff", self.profiled_handoff(prompt_tokens), actual_s)

    def observe_gap(self, instance_id: str, batch: int, context_tokens: float | None, gap_s: float) -> None:
        """A gap between two deltas of a request decoding on `instance_id` in a batch of `batch`."""
        base = self.by_instance.get(instance_id) or self.default
        self.observe(instance_id, "decode", base.decode_step_time(max(batch, 1), context_tokens or None), gap_s)

    def observe_finished(self, placement: Placement, ttft_s: float | None, first_gap_s: float | None) -> None:
        """A finished placement: its TTFT against the profiled queue + prefill, its handoff gap."""
        if placement.basis is None:
            return
        prefill_basis, _, prompt_tokens = placement.basis
        if ttft_s is not None:
            self.observe(placement.prefill, "prefill", prefill_basis, ttft_s)
        if first_gap_s is not None and not placement.colocated:
            self.observe_handoff(placement.decode, int(prompt_tokens), first_gap_s)


def load_latency_model(perf: "PerfModelConfig") -> LatencyModel:  # noqa: F821 - typed in shared.slo_config
    """A model from a profile CSV (default: the bundled demo CPU profile); raises ProfileError on bad files."""
    from pdserve.planner.perf_model import ProfileSet

    profiles = ProfileSet.from_csv(perf.profile or DEMO_PROFILE)
    keys = profiles.keys()
    model = perf.model or keys[0][0]
    hardware = perf.hardware or next((k[1] for k in keys if k[0] == model), keys[0][1])
    return LatencyModel(profiles.get(model, hardware), kv_bytes_per_token=perf.kv_bytes_per_token,
                        bandwidth_bps=perf.handoff_bandwidth_gbps * 1e9,
                        handoff_latency_s=perf.handoff_latency_ms / 1000,
                        max_prefill_tokens=perf.max_prefill_tokens, weight=perf.calibration_weight,
                        step_weight=perf.step_calibration_weight)
