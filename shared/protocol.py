"""Internal types that cross process boundaries (gateway <-> router <-> workers).

Plain dataclasses: Ray pickles them, tests build them by hand. The router only
ever sees `EngineStats` (counts), never block tables or token contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.shared.roles import InstanceState, Role


# SamplingParams.extra_args key: the request's first output token is this one (a
# decode instance continuing from the token a prefill instance already sent).
FIRST_TOKEN_KEY = "pdserve_first_token"


@dataclass
class EngineRequest:
    """A tokenized request for one engine instance.

    `sampling_params` is a `vllm.SamplingParams` (typed loosely so that this
    module, and the router with it, imports without vLLM).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any
    arrival_time: float = 0.0


@dataclass
class TokenLogprob:
    """One sampled token's logprob and the top alternatives at that position."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class OutputDelta:
    """New output of one choice (`index`) of one request since the last delta."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set on the choice's last delta
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time_s: float | None = None  # engine-side queued -> scheduled, on the first delta
    request_finished: bool = False  # every choice of the request is done
    handoff_s: float | None = None  # disaggregated: P's first token -> D's first step, on D's first delta
    error: str | None = None  # the engine failed this request
    error_kind: str | None = None  # how: "invalid" (the engine refused the input), "dead" (the engine died)


@dataclass
class EngineInfo:
    """What an instance reports once its engine is up."""

    instance_id: str
    role: Role
    model: str
    max_model_len: int
    block_size: int
    kv_blocks_total: int
    max_logprobs: int = 20  # the engine refuses requests asking for more
    node_ip: str = ""  # the Ray node the instance runs on
    kv_host: str | None = None  # the address its KV transport advertises (None: no connector)
    kv_events_endpoint: str | None = None  # ZMQ PUB of the engine's KV-cache events (prefix index), if on
    kv_events_replay_endpoint: str | None = None  # where missed event batches can be asked for again


@dataclass
class EngineStats:
    """An instance's load, as the engine's scheduler last reported it."""

    instance_id: str
    role: Role
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    kv_blocks_total: int = 0
    in_flight: int = 0  # requests the worker holds (submitted, not yet finished)
    healthy: bool = True
    kv_transfer: dict[str, float] = field(default_factory=dict)  # KV connector counters since start
    state: InstanceState = InstanceState.READY
    restarts: int = 0  # engines the controller restarted on this instance
    orphans_aborted: int = 0  # engine-core requests its front end had forgotten, aborted (`worker.orphans`)

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - round(self.kv_usage * self.kv_blocks_total)
