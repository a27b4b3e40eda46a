"""The `slo` section of the config tree: per-class SLO defaults, the performance model, admission control.

Used by `routing_policy: slo_aware` (placement against each request's SLO)
and, whatever the policy, by the SLO-attainment metrics.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pdserve.shared.slo import Priority, RequestSlo


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassSlo(_Strict):
    """Default targets of one priority class (the served model's; requests override them)."""

    ttft_ms: float = Field(gt=0, description="Time-to-first-token target, milliseconds.")
    tpot_ms: float = Field(gt=0, description="Mean time-per-output-token target (after the first), milliseconds.")


class PerfModelConfig(_Strict):
    """What the router predicts latencies from: a profile, then online calibration."""

    profile: str | None = Field(None, description="Profile CSV (`pdserve profile` output, Splitwise's format); "
                                                  "default: the bundled demo-model CPU profile.")
    model: str | None = Field(None, description="Model column of the profile to use; default: its only/first one.")
    hardware: str | None = Field(None, description="Hardware column of the profile; default: its first one.")
    kv_bytes_per_token: float = Field(8192.0, ge=0, description="KV bytes per prompt token moved P->D "
                                      "(demo model, float32: 2 x 4 layers x 256 x 4 B = 8 KiB; bf16 halves it).")
    handoff_bandwidth_gbps: float = Field(0.6, gt=0, description="P->D transport bandwidth, GB/s (gloo/TCP on "
                                                                 "one host measured 0.6-2.2).")
    handoff_latency_ms: float = Field(2.0, ge=0, description="Fixed cost of one handoff (handshake, first byte).")
    max_prefill_tokens: int = Field(2048, gt=0, description="Prompt tokens one prefill iteration takes (the "
                                                            "engine's max_num_batched_tokens).")
    calibration_weight: float = Field(0.1, gt=0, le=1, description="Weight of one finished request in the online "
                                      "calibration of TTFT and handoff (a line from profiled to actual, fitted "
                                      "with exponential forgetting).")
    step_calibration_weight: float = Field(0.02, gt=0, le=1, description="Weight of one decode gap (two deltas "
                                           "of a request, at the batch it ran in) in the decode step's calibration.")


class AdmissionConfig(_Strict):
    """What happens to a request no placement meets the SLO of."""

    interactive_queue: int = Field(64, ge=0, description="Most interactive requests waiting for a placement.")
    batch_queue: int = Field(256, ge=0, description="Most batch requests waiting for a placement.")
    interactive_timeout_s: float = Field(2.0, ge=0, description="Longest wait of an interactive request in the "
                                         "queue (capped by its TTFT target); 0: reject at once.")
    batch_timeout_s: float = Field(30.0, ge=0, description="Longest wait of a batch request (capped by its TTFT "
                                                            "target); 0: reject at once.")
    mixed_fallback: bool = Field(True, description="Splitwise's mixed pool: a decode instance prefills a short "
                                 "prompt itself when no prefill instance meets TTFT, a prefill instance decodes "
                                 "when no decode instance meets TPOT.")
    fallback_max_prompt_tokens: int = Field(512, ge=0, description="Longest prompt a decode instance prefills "
                                                                   "itself in the fallback.")
    batch_kv_reserve: float = Field(0.1, ge=0, lt=1, description="Fraction of a decode instance's KV a batch "
                                    "request must leave free (headroom kept for interactive requests).")
    min_retry_after_s: float = Field(1.0, ge=0, description="Smallest Retry-After sent with a 429.")
    slo_margin: float = Field(0.1, ge=0, lt=1, description="Share of each TTFT and TPOT target kept free for "
                              "prediction error: a placement must be predicted within (1 - margin) x target.")
    max_forecast_slots: int = Field(16, ge=1, description="How many future slots a refusal forecasts (the queue "
                                    "position up to which a request may wait for one).")


class SloRoutingConfig(_Strict):
    """Per-request SLOs: defaults per class, the latency model, admission control."""

    interactive: ClassSlo = Field(default_factory=lambda: ClassSlo(ttft_ms=2000, tpot_ms=200),
                                  description="Targets of interactive requests (the served model's defaults).")
    batch: ClassSlo = Field(default_factory=lambda: ClassSlo(ttft_ms=30000, tpot_ms=1000),
                            description="Targets of batch requests.")
    default_priority: Priority = Field(Priority.INTERACTIVE, description="Class of a request that names none.")
    perf: PerfModelConfig = Field(default_factory=PerfModelConfig, description="The latency model's inputs.")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig,
                                       description="Queueing, fallback and refusal of requests no placement meets.")
    prediction_log: str | None = Field(None, description="Append one JSON line per finished placement (predicted "
                                       "and actual TTFT and TPOT, instances, reason) to this file; for benchmarks.")

    def resolve(self, ttft_ms: float | None = None, tpot_ms: float | None = None,
                priority: Priority | None = None) -> RequestSlo:
        """A request's SLO: its own values over its class's defaults."""
        cls = priority or self.default_priority
        default = self.interactive if cls is Priority.INTERACTIVE else self.batch
        return RequestSlo((ttft_ms or default.ttft_ms) / 1000, (tpot_ms or default.tpot_ms) / 1000, cls)

    def queue_limit(self, priority: Priority) -> tuple[int, float]:
        a = self.admission
        return (a.interactive_queue, a.interactive_timeout_s) if priority is Priority.INTERACTIVE else \
            (a.batch_queue, a.batch_timeout_s)
