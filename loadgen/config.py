"""Benchmark configuration: what to hit, what to send, when to stop, which SLOs.

Every option of `pdserve bench` lands in one of these models, so a run's full
configuration is written into its result.json and can be reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdserve.loadgen.errors import BenchConfigError

Endpoint = Literal["/v1/completions", "/v1/chat/completions"]
ArrivalKind = Literal["trace", "poisson", "gamma", "closed"]
LengthDist = Literal["fixed", "uniform", "exponential", "lognormal"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetConfig(_Strict):
    base_url: str = Field(description="Base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8000.")
    endpoint: Endpoint = Field(default="/v1/completions", description="API path that receives the requests.")
    model: str = Field(description="Model name sent in every request.")
    api_key: str | None = Field(default=None, repr=False, exclude=True,
                                description="Bearer token; never written to result files.")
    request_timeout_s: float = Field(default=600.0, gt=0,
                                     description="A request still running after this is failed as a timeout.")
    temperature: float | None = Field(default=None, ge=0,
                                      description="Sampling temperature sent; None: the server's default (1.0).")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling; None: the server's default.")
    top_k: int | None = Field(default=None, description="Top-k sampling (-1 or 0: off); None: the server's default.")
    extra_body: dict[str, Any] = Field(default_factory=dict,
                                       description="More request fields, merged into every request (e.g. seed).")
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="More HTTP headers on every request (e.g. x-priority: batch).")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        # Accept both http://host:port and http://host:port/v1 as the base.
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base + self.endpoint

    @property
    def is_chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"


class WorkloadConfig(_Strict):
    trace: str | None = Field(default=None, description="'code', 'conv' or a CSV path; None for synthetic lengths.")
    trace_dir: Path | None = Field(default=None, description="Directory searched first for the named traces.")
    trace_start_s: float = Field(default=0.0, ge=0, description="Skip this many seconds of the trace.")
    input_len: int = Field(default=1024, ge=1, description="Synthetic: mean prompt length in tokens.")
    output_len: int = Field(default=128, ge=1, description="Synthetic: mean output length in tokens.")
    length_dist: LengthDist = Field(default="fixed", description="Synthetic: distribution of both lengths.")
    length_spread: float = Field(default=0.5, ge=0,
                                 description="uniform: +/- fraction of the mean; lognormal: sigma.")
    max_input_tokens: int | None = Field(default=None, ge=1, description="Clip prompt lengths to this.")
    max_output_tokens: int | None = Field(default=None, ge=1, description="Clip output lengths to this.")
    shared_prefix_fraction: float = Field(default=0.0, ge=0, le=1,
                                          description="Fraction of requests whose prompt starts with a shared prefix.")
    shared_prefix_len: int = Field(default=0, ge=0, description="Length of each shared prefix in tokens.")
    shared_prefix_groups: int = Field(default=1, ge=1, description="Number of distinct shared prefixes.")
    tokenizer: str = Field(description="Tokenizer name or local directory (defaults to the model).")
    seed: int = Field(default=0, description="Seed for lengths, arrivals and prompt words.")


class ArrivalConfig(_Strict):
    kind: ArrivalKind = Field(description="trace timestamps, Poisson, gamma, or a closed loop.")
    rate: float | None = Field(default=None, gt=0,
                               description="Requests/s; for traces, rescales the real inter-arrival times.")
    burstiness: float = Field(default=1.0, gt=0, description="Gamma shape: <1 burstier than Poisson, >1 smoother.")
    concurrency: int | None = Field(default=None, ge=1, description="Closed loop: requests kept in flight.")


class StopConfig(_Strict):
    duration_s: float | None = Field(default=None, gt=0, description="Send no request after this many seconds.")
    num_requests: int | None = Field(default=None, ge=1, description="Send at most this many requests.")


class SloConfig(_Strict):
    ttft_ms: float | None = Field(default=None, gt=0, description="TTFT SLO in milliseconds.")
    tpot_ms: float | None = Field(default=None, gt=0, description="TPOT SLO in milliseconds.")
    e2el_ms: float | None = Field(default=None, gt=0, description="End-to-end latency SLO in milliseconds.")
    ttft_x: float | None = Field(default=None, gt=0, description="TTFT SLO as a multiple of the unloaded TTFT.")
    tpot_x: float | None = Field(default=None, gt=0, description="TPOT SLO as a multiple of the unloaded TPOT.")
    e2el_x: float | None = Field(default=None, gt=0, description="E2E SLO as a multiple of the unloaded E2E.")
    unloaded_probes: int = Field(default=3, ge=1, description="Sequential requests that measure unloaded latency.")
    send: bool = Field(default=False, description="Send the TTFT and TPOT SLOs with every request "
                                                  "(x-slo-ttft-ms, x-slo-tpot-ms), so that an SLO-aware server "
                                                  "admits against the targets goodput is counted on.")

    @model_validator(mode="after")
    def _one_form_per_metric(self) -> "SloConfig":
        for name in ("ttft", "tpot", "e2el"):
            if getattr(self, f"{name}_ms") is not None and getattr(self, f"{name}_x") is not None:
                raise BenchConfigError(f"give the {name} SLO in ms or as a multiple, not both")
        return self

    @property
    def needs_unloaded(self) -> bool:
        return any(v is not None for v in (self.ttft_x, self.tpot_x, self.e2el_x))

    @property
    def any(self) -> bool:
        return self.needs_unloaded or any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


class BenchConfig(_Strict):
    target: TargetConfig
    workload: WorkloadConfig
    arrivals: ArrivalConfig
    stop: StopConfig
    slo: SloConfig = Field(default_factory=SloConfig)
    percentiles: list[float] = Field(default=[50.0, 90.0, 99.0], description="Percentiles reported per metric.")
    output_dir: Path = Field(description="Where result.json, requests.csv and the charts go.")
    sweep_rates: list[float] | None = Field(default=None, description="Run once per request rate.")
    label: str | None = Field(default=None, description="Name of this run in tables and charts.")
    progress: bool = Field(default=True, description="Show a progress bar.")
    charts: bool = Field(default=True, description="Write PNG charts.")
    preflight: bool = Field(default=True, description="Send one small request first; abort if it fails.")

    @model_validator(mode="after")
    def _consistent(self) -> "BenchConfig":
        a, w, s = self.arrivals, self.workload, self.stop
        if a.kind == "trace" and w.trace is None:
            raise BenchConfigError("--arrival trace needs --trace")
        if a.kind == "closed" and a.concurrency is None:
            raise BenchConfigError("a closed loop needs --concurrency")
        if a.kind in ("poisson", "gamma") and a.rate is None and not self.sweep_rates:
            raise BenchConfigError(f"{a.kind} arrivals need --rate (or --sweep-rates)")
        # The run must end by itself: a trace is finite, anything else needs a bound.
        if w.trace is None and s.duration_s is None and s.num_requests is None:
            raise BenchConfigError("synthetic load needs --duration and/or --num-requests")
        if self.sweep_rates and a.kind == "closed":
            raise BenchConfigError("--sweep-rates sweeps request rates; it does not apply to a closed loop")
        if any(not 0 < p < 100 for p in self.percentiles):
            raise BenchConfigError("percentiles must lie strictly between 0 and 100")
        return self
