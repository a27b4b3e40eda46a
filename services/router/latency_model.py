"""Predicted latencies per instance: prefill, decode step, KV handoff; calibrated online.

One class, `LatencyModel`, used by the SLO-aware policy in the live router and
in the cluster simulator. It starts from a profile's step model (the planner's
`PerfModel`: prefill time from batch prompt tokens, decode step time from batch
size and context tokens) and keeps a multiplicative correction per instance and
phase, learned from observations (actual / predicted, moving average in log
space). Pure: numbers in, numbers out, no clock, no I/O; whoever observes feeds it.

TTFT here is queue + prefill on the instance computing the prompt: pdserve
streams P's token before the KV moves (DESIGN: TTFT never waits for the
handoff), so the handoff is charged to the first token gap, i.e. to TPOT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pdserve.router.snapshot import InstanceSnapshot

_FACTOR_MIN, _FACTOR_MAX = 0.05, 20.0  # a correction beyond these is a broken observation, not a slow machine
DEMO_PROFILE = Path(__file__).resolve().parents[1] / "planner" / "profiles" / "demo_cpu.csv"


class StepModel(Protocol):
    """What a profile provides (the planner's `PerfModel` is one)."""

    def prefill_time(self, batch_tokens: int) -> float: ...

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float: ...


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
    weight: float = 0.2
    # (instance id, "prefill" | "decode") -> correction factor; "handoff" under instance id "*"
    factors: dict[tuple[str, str], float] = field(default_factory=dict)

    def base(self, instance: InstanceSnapshot) -> StepModel:
        return self.by_instance.get(instance.instance_id) or self.by_hardware.get(instance.hardware) or self.default

    def factor(self, instance_id: str, phase: str) -> float:
        return self.factors.get((instance_id, phase), 1.0)

    # -- predictions ---------------------------------------------------------------------------
    def prefill_time(self, instance: InstanceSnapshot, tokens: int) -> float:
        """`tokens` prompt tokens through `instance`, in iterations of at most `max_prefill_tokens`."""
        if tokens <= 0:
            return 0.0
        base, chunk = self.base(instance), self.max_prefill_tokens
        full, rest = divmod(tokens, chunk)
        seconds = full * base.prefill_time(chunk) + (base.prefill_time(rest) if rest else 0.0)
        return seconds * self.factor(instance.instance_id, "prefill")

    def ttft(self, instance: InstanceSnapshot, prompt_tokens: int) -> float:
        """Queue wait (prompts ahead, not yet prefilled) plus this prompt's prefill.

        A decode batch on the same instance rides along in each prefill iteration (mixed
        batching), so its requests count as tokens of the iteration, as in the simulator.
        """
        riders = instance.num_running if instance.role.runs_decode else 0
        return self.prefill_time(instance, instance.outstanding_prefill_tokens + prompt_tokens + riders)

    def decode_step(self, instance: InstanceSnapshot, batch: int, context_tokens: float | None) -> float:
        step = self.base(instance).decode_step_time(max(batch, 1), context_tokens or None)
        return step * self.factor(instance.instance_id, "decode")

    def handoff_time(self, prompt_tokens: int) -> float:
        return (self.handoff_latency_s + prompt_tokens * self.kv_bytes_per_token / self.bandwidth_bps) \
            * self.factor("*", "handoff")

    def tpot(self, instance: InstanceSnapshot, prompt_tokens: int, max_tokens: int, handoff_s: float = 0.0) -> float:
        """Mean time per output token of a request joining `instance`'s batch (handoff in the first gap).

        The batch it joins is every request routed there and not finished (the router's count)
        or the engine's running batch, whichever is larger; its context grows by this request's
        prompt plus half its output (the mean over its decode).
        """
        batch = max(instance.outstanding, instance.num_running) + 1
        context = instance.outstanding_context_tokens + prompt_tokens + max_tokens / 2 \
            if instance.outstanding_context_tokens else None
        step = self.decode_step(instance, batch, context)
        gaps = max(max_tokens - 1, 1)
        return step + handoff_s / gaps

    # -- calibration -------------------------------------------------------------------------
    def observe(self, instance_id: str, phase: str, predicted_s: float, actual_s: float) -> None:
        """One observation of a prediction made with the current factor: move the factor toward it."""
        if predicted_s <= 0 or actual_s <= 0 or not math.isfinite(actual_s):
            return  # nothing to learn (a one-token request, a failed one)
        key = (instance_id, phase)
        old = self.factors.get(key, 1.0)
        new = math.exp(math.log(old) + self.weight * math.log(actual_s / predicted_s))
        self.factors[key] = min(max(new, _FACTOR_MIN), _FACTOR_MAX)

    def observe_step(self, instance: InstanceSnapshot, batch: int, context_tokens: float | None,
                     actual_s: float) -> None:
        """A measured decode step (an engine's step time at a known batch and context)."""
        self.observe(instance.instance_id, "decode", self.decode_step(instance, batch, context_tokens), actual_s)

    def observe_handoff(self, prompt_tokens: int, actual_s: float) -> None:
        self.observe("*", "handoff", self.handoff_time(prompt_tokens), actual_s)


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
                        max_prefill_tokens=perf.max_prefill_tokens, weight=perf.calibration_weight)
