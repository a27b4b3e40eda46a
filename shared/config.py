"""pdserve's one typed configuration tree.

Precedence, lowest first: field defaults < YAML file < environment < CLI flags.
Environment overrides are read in exactly one place, `env_overrides()`, so that
nothing else in the code base looks at `os.environ` for configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pdserve.shared.errors import ConfigError
from pdserve.shared.slo_config import SloRoutingConfig

# Engine arguments passed through to vLLM must be scalars or lists of scalars;
# anything richer belongs in a typed field of its own.
EngineArgValue = Union[str, int, float, bool, None, list[Union[str, int, float, bool]]]


def demo_model_path() -> str:
    """The demo model shipped inside the package (`services/demo_model/`)."""
    import pdserve

    return str(Path(pdserve.__file__).resolve().parent / "demo_model")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    """How every vLLM engine instance is built (same model on every pool)."""

    model: str = Field(default_factory=demo_model_path,
                       description="Local HF-format model directory or hub id; default: the bundled demo model.")
    served_model_name: str | None = Field(None, description="Name clients use in `model`; default: the model's folder or hub id.")
    stall_timeout_s: float = Field(
        30.0, gt=0, description="An engine core that answers no health ping for this long (hung, frozen) is "
                                "treated as dead: its processes are killed and it is restarted.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; default: the model's.")
    dtype: str = Field("auto", description="Weights and activations dtype passed to vLLM (auto, float32, bfloat16, float16).")
    max_model_len: int | None = Field(None, gt=0, description="Context length (prompt + output tokens); default: the model's.")
    block_size: int | None = Field(None, gt=0, description="KV-cache block size in tokens; default: vLLM's for the platform.")
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="Bytes of KV cache per instance. Takes precedence over gpu_memory_utilization.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Fraction of device memory for weights and KV (on CPU: of host memory). Default: 0.15 on CPU, vLLM's on GPU.")
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel degree of every instance, unless "
                                                           "its pool says (pools.<role>.engine).")
    max_num_seqs: int | None = Field(None, gt=0, description="Most requests in one engine batch.")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="Most tokens in one engine step.")
    enable_prefix_caching: bool | None = Field(None, description="Reuse KV of shared prompt prefixes; default: vLLM's.")
    publish_kv_events: bool = Field(
        False, description="Publish the engine's KV-cache events (blocks stored, removed) over ZMQ for the "
                           "router's prefix index; set by `pdserve serve` when the routing policy needs them.")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (faster start-up; on CPU it matters little).")
    seed: int = Field(0, description="Engine seed: with the same seed, sampled outputs repeat.")
    engine_args: dict[str, EngineArgValue] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments by their Python name (e.g. {'max_logprobs': 50}); checked at start-up.")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.name if path.is_dir() else self.model


# Engine settings that must agree across pools (a P's KV must fit D's cache as it is); they live in
# `engine` only, and a pool's engine_args may not set them.
# The router's placement policies by name. Spelled here so that the config validates without importing the
# router (shared/ imports nothing above it); router/registry.py refuses to load if its table differs.
POLICY_NAMES = ("round_robin", "least_loaded", "kv_jsq", "splitwise", "prefix_aware", "slo_aware")

CROSS_POOL_ENGINE_ARGS = frozenset({"model", "tokenizer", "dtype", "kv_cache_dtype", "block_size", "max_model_len",
                                    "served_model_name", "tensor_parallel_size"})


class PoolEngineConfig(_Strict):
    """One pool's own engine settings, over `engine` (Splitwise's pools differ in batch shape and GPU)."""

    tensor_parallel_size: int | None = Field(
        None, ge=1, description="Tensor-parallel degree of each instance; default: engine's. Prefill and decode "
                                "must match (rank r pairs with rank r).")
    max_num_seqs: int | None = Field(None, gt=0, description="Most requests in one batch; default: engine's.")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="Most tokens in one step; default: engine's.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0, description="Device-memory fraction for weights and KV; default: engine's.")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="KV-cache bytes per instance; default: engine's.")
    enable_prefix_caching: bool | None = Field(None, description="Prefix caching on this pool; default: engine's.")
    engine_args: dict[str, EngineArgValue] = Field(
        default_factory=dict, description="Further vLLM engine arguments for this pool, over engine.engine_args.")

    @field_validator("engine_args")
    @classmethod
    def _no_cross_pool_args(cls, value: dict[str, EngineArgValue]) -> dict[str, EngineArgValue]:
        shared = sorted(CROSS_POOL_ENGINE_ARGS & set(value))
        if shared:
            raise ValueError(f"{shared} must be the same on every pool: set them under `engine`, not per pool")
        return value


class PoolConfig(_Strict):
    """One pool: how many instances, where Ray places them, and their engine settings."""

    instances: int = Field(0, ge=0, description="Engine instances in this pool.")
    cpus_per_instance: float | None = Field(None, gt=0, description="Ray CPUs each reserves; default: pools'.")
    gpus_per_instance: float | None = Field(None, ge=0, description="Ray GPUs each reserves; default: pools'.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each instance reserves, e.g. "
                                          "{'accelerator_type:H100': 0.001} to land on H100 nodes.")
    engine: PoolEngineConfig = Field(default_factory=PoolEngineConfig)


def _pool(value: object) -> object:
    """A bare count is a pool of that many default instances (`prefill: 2`)."""
    return {"instances": value} if isinstance(value, int) and not isinstance(value, bool) else value


class PoolsConfig(_Strict):
    """The engine pools by role; a pool is a count or a mapping (see PoolConfig)."""

    mixed: PoolConfig = Field(default_factory=PoolConfig,
                              description="Instances that run prefill and decode colocated.")
    prefill: PoolConfig = Field(default_factory=lambda: PoolConfig(instances=1),
                                description="Prefill instances (disaggregated serving).")
    decode: PoolConfig = Field(default_factory=lambda: PoolConfig(instances=1),
                               description="Decode instances (disaggregated serving).")
    cpus_per_instance: float = Field(1.0, gt=0, description="Ray CPUs each instance reserves, unless its pool says.")
    gpus_per_instance: float = Field(
        0.0, ge=0, description="Ray GPUs each instance reserves unless its pool says (0 on CPU machines).")
    drain_timeout_s: float = Field(
        600.0, gt=0, description="Scaling down: longest wait for a leaving instance's requests to finish "
                                 "before it is stopped anyway.")
    start_timeout_s: float = Field(
        1800.0, gt=0, description="Scaling up: longest wait for a new instance to be placed (a Ray node with "
                                  "its resources, e.g. one an autoscaler adds) and its engine loaded; then "
                                  "its actor is killed and the start counted as failed.")
    bind_cores: bool = Field(
        True, description="CPU instances on a local Ray bind their compute threads to cores of their own "
                          "(cpus_per_instance each, in instance order), so a prefill and a decode instance never "
                          "share a core; the cores left over are the front end's (gateway, Ray's daemons, "
                          "engine schedulers are pinned there); off: vLLM's own binding (each engine takes "
                          "what it sees).")
    shm_spin_s: float | None = Field(
        0.05, ge=0, description="CPU engines bound to cores (bind_cores) that leave no core for the front end: "
                                "how long vLLM's engine core and workers busy-wait on their shared-memory queue "
                                "after a message before sleeping until the next one (vLLM's own: 1 s). There, "
                                "spinning idle engines take the time the gateway and the other instances need; "
                                "with a core left over, vLLM's spin is kept (waking from a poll costs more). "
                                "Null: vLLM's own everywhere. No effect on GPUs.")

    @field_validator("mixed", "prefill", "decode", mode="before")
    @classmethod
    def _as_pool(cls, value: object) -> object:
        return _pool(value)

    @model_validator(mode="after")
    def _check_roles(self) -> "PoolsConfig":
        mixed, prefill, decode = self.mixed.instances, self.prefill.instances, self.decode.instances
        if mixed + prefill + decode == 0:
            raise ValueError("at least one engine instance is needed")
        if (prefill == 0) != (decode == 0):
            raise ValueError("disaggregated serving needs both prefill and decode instances "
                             f"(got prefill={prefill}, decode={decode})")
        return self

    def cpus_for(self, pool: PoolConfig) -> float:
        return pool.cpus_per_instance if pool.cpus_per_instance is not None else self.cpus_per_instance

    def gpus_for(self, pool: PoolConfig) -> float:
        return pool.gpus_per_instance if pool.gpus_per_instance is not None else self.gpus_per_instance

    @property
    def total(self) -> int:
        return self.mixed.instances + self.prefill.instances + self.decode.instances


def engine_for(engine: "EngineConfig", pool: PoolConfig) -> "EngineConfig":
    """`engine` with `pool`'s own settings over it: what that pool's instances run."""
    own = pool.engine
    update = {name: getattr(own, name) for name in
              ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "kv_cache_memory_bytes",
               "enable_prefix_caching") if getattr(own, name) is not None}
    if own.tensor_parallel_size is not None:
        update["tensor_parallel_size"] = own.tensor_parallel_size
    update["engine_args"] = {**engine.engine_args, **own.engine_args}
    return engine.model_copy(update=update)


class PrefixRoutingConfig(_Strict):
    """Prefix-aware placement (`routing_policy: prefix_aware`): where the prompt's KV cache already is.

    Decode (and mixed) instances are scored `hit_weight * hit - load_weight * excess`, where `hit`
    is the fraction of the prompt's tokens the instance holds and `excess` its outstanding
    requests above the least loaded candidate's, over (theirs + `balance_slack`); prefill
    instances by the prompt tokens ahead of this request's first token,
    `load_weight * queued - hit_weight * held`. With no hit anywhere the base policy decides.
    """

    index: Literal["events", "sent"] = Field(
        "events", description="events: engines publish their KV-cache events (vLLM kv_events_config) and the "
                              "router follows them (precise); sent: the router's own record of which prompts it "
                              "sent where, expiring after sent_ttl_s (approximate, no engine support needed).")
    hit_weight: float = Field(1.0, ge=0, description="Weight of the prefix an instance holds.")
    load_weight: float = Field(1.0, ge=0, description="Weight of an instance's load against its prefix hit.")
    balance_slack: float = Field(
        4.0, gt=0, description="Decode: requests above the least loaded candidate an instance may carry at "
                               "(load_weight x hit) full weight; larger values follow the prefix further.")
    base_policy: str = Field("least_loaded", description="Policy deciding when no instance holds any prefix.")
    sent_ttl_s: float = Field(300.0, gt=0, description="index=sent: how long a sent prompt is assumed cached.")
    pending_ttl_s: float = Field(
        5.0, gt=0, description="index=events: how long a placement counts as cached before its engine's events "
                               "confirm it (events follow the step that computed the blocks).")
    hash_algo: Literal["sha256", "sha256_cbor"] = Field(
        "sha256", description="vLLM's prefix_caching_hash_algo on every engine; the router hashes prompts alike.")
    hash_seed: str | None = Field(
        None, description="The engines' PYTHONHASHSEED if they run with one (it seeds vLLM's block hashes); "
                          "default: vLLM's fixed seed.")
    events_poll_s: float = Field(0.1, gt=0, description="Longest wait of the KV event subscriber's poll.")
    events_replay_timeout_s: float = Field(5.0, gt=0, description="A replay request to an engine's event "
                                                                  "publisher unanswered this long is retried.")

    @field_validator("base_policy")
    @classmethod
    def _known_base(cls, value: str) -> str:
        if value not in POLICY_NAMES or value == "prefix_aware":
            raise ValueError(f"unknown base policy {value!r}; "
                             f"choose from {sorted(set(POLICY_NAMES) - {'prefix_aware'})}")
        return value


class GatewayConfig(_Strict):
    """The OpenAI-compatible HTTP surface."""

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the gateway listens on (0: any free port).")
    api_key: SecretStr | None = Field(None, description="If set, clients must send `Authorization: Bearer <key>`.")
    routing_policy: str = Field("least_loaded", description="Placement policy (round_robin, least_loaded, kv_jsq, splitwise, "
                                                                "prefix_aware, slo_aware).")
    stats_interval_s: float = Field(0.5, gt=0, description="How often instance stats are refreshed for routing and metrics.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Gateway log level.")

    @field_validator("routing_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICY_NAMES:
            raise ValueError(f"unknown routing policy {value!r}; choose from {sorted(POLICY_NAMES)}")
        return value


class KVTransferConfig(_Strict):
    """How prefill instances hand KV caches to decode instances (disaggregated pools only).

    The one source of every KV-transfer knob: the launcher hands it whole to
    each engine's connector (hosts resolved on the instance's own node).
    """

    transport: Literal["tcp", "gloo", "nccl"] = Field(
        "tcp", description="KV transport between instances: tcp or gloo on CPU, nccl on GPUs.")
    transfer_timeout_s: float = Field(
        30.0, gt=0, description="A KV transfer not finished this long after the prefill started sending it "
                                "fails; decode recomputes the prompt.")
    reservation_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for a decode instance to reserve KV room for a request (it may "
                                 "queue for room), and for a prefill to start sending into reserved blocks. "
                                 "A backstop: a failure on either side ends the wait at once.")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="Limit on dialing a peer (a transport link, the router's reservation inbox) "
                                "and completing its handshake.")
    send_timeout_s: float = Field(
        10.0, gt=0, description="A send that makes no progress this long (a frozen or vanished peer) breaks the "
                                "link: its transfers fail and their blocks are freed.")
    bind_host: str | None = Field(
        None, description="Interface the KV transports and the router's reservation inbox listen on; "
                          "default: the node's Ray address ('0.0.0.0' for every interface).")
    advertise_host: str | None = Field(
        None, description="Address peers dial; default: bind_host, or the node's Ray address when binding "
                          "every interface (behind NAT, set the address other nodes route to).")
    port_range: tuple[int, int] | None = Field(
        None, description="Inclusive [low, high] of ports to listen on (firewalled clusters), e.g. "
                          "[20000, 20999] or '20000-20999'; default: any free port.")

    @field_validator("port_range", mode="before")
    @classmethod
    def _parse_range(cls, value: object) -> object:
        if isinstance(value, str):
            low, sep, high = value.partition("-")
            if not sep or not low.strip().isdigit() or not high.strip().isdigit():
                raise ValueError(f"port_range {value!r} is not 'LOW-HIGH'")
            return int(low), int(high)
        return value

    @field_validator("port_range")
    @classmethod
    def _check_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1] <= 65535:
            raise ValueError(f"port_range {list(value)} must satisfy 1 <= low <= high <= 65535")
        return value


class StreamResumeConfig(_Strict):
    """Streams whose engine dies mid-request go on elsewhere (`pdserve.router.resume`)."""

    enabled: bool = Field(True, description="Continue a stream whose instance died on another healthy instance "
                                            "by recomputing prompt + generated tokens; off: the client gets an "
                                            "error event as soon as the instance dies.")
    max_resumes: int = Field(2, ge=0, description="Most recoveries one request may make (each on another "
                                                  "instance) before its stream ends with an error.")
    timeout_s: float = Field(120.0, gt=0, description="Deadline for a continuation's first token (it recomputes "
                                                      "prompt + generated tokens); past it that instance counts "
                                                      "as failed too.")


class MigrationConfig(_Strict):
    """Live migration of decoding requests between decode instances (`pdserve.router.migration`)."""

    enabled: bool = Field(False, description="Move decoding requests, KV and all, between decode instances: "
                                             "drains move requests off instead of waiting for them, and the "
                                             "policy below runs every interval_s. Needs disaggregated pools.")
    interval_s: float = Field(1.0, gt=0, description="How often the migration policy looks at the cluster.")
    kv_spread: float = Field(0.3, gt=0, le=1, description="KV-use difference between the most and least used "
                                                          "decode instances that moves a request (load balance).")
    tpot_spread: float = Field(1.5, gt=1, description="Slowest/fastest predicted TPOT ratio that moves a request.")
    preempt_kv_usage: float = Field(0.9, gt=0, le=1, description="KV use at which an instance sheds its "
                                                                 "shortest requests rather than pre-empt.")
    headroom_blocks: int = Field(4, ge=0, description="Free KV blocks a target keeps after taking a request.")
    max_per_instance: int = Field(1, ge=1, description="Concurrent migrations one instance takes part in.")
    reservation_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the target's block "
                                                                 "reservation before the source frees its KV.")
    switch_timeout_s: float = Field(10.0, gt=0, description="Longest wait for the client's stream to reach the "
                                                            "source's last token before the move is called off.")


class RayConfig(_Strict):
    """Where the engine actors run."""

    address: str | None = Field(None, description="Ray cluster to join (e.g. 'auto'); default: start a local one.")
    namespace: str = Field("pdserve", description="Ray namespace for pdserve's actors.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray (default: enough for all instances).")


class ServeConfig(_Strict):
    """Everything `pdserve serve` needs."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    prefix_routing: PrefixRoutingConfig = Field(default_factory=PrefixRoutingConfig)
    slo: SloRoutingConfig = Field(default_factory=SloRoutingConfig,
                                  description="Per-request SLOs (class defaults, request overrides), the latency "
                                              "model and admission control of `routing_policy: slo_aware`; the "
                                              "SLO-attainment metrics use the targets whatever the policy.")
    ray: RayConfig = Field(default_factory=RayConfig)
    resume: StreamResumeConfig = Field(default_factory=StreamResumeConfig,
                                       description="Recovery of streams whose instance dies mid-request.")
    migration: MigrationConfig = Field(default_factory=MigrationConfig,
                                       description="Live migration of decoding requests (off by default).")

    @property
    def publishes_kv_events(self) -> bool:
        """Engines publish KV-cache events: the prefix-aware policy follows them."""
        return self.gateway.routing_policy == "prefix_aware" and self.prefix_routing.index == "events"

    @model_validator(mode="after")
    def _check_pools(self) -> "ServeConfig":
        """Rules across pools that only the whole tree can check."""
        pools = self.pools
        tp = {name: engine_for(self.engine, getattr(pools, name)).tensor_parallel_size
              for name in ("mixed", "prefill", "decode")}
        if pools.prefill.instances and tp["prefill"] != tp["decode"]:
            raise ValueError(
                f"prefill tensor_parallel_size {tp['prefill']} differs from decode's {tp['decode']}: rank r of a "
                "prefill instance sends its share of the KV heads to rank r of a decode instance, so both pools "
                "need the same degree")
        for name, degree in tp.items():
            gpus = pools.gpus_for(getattr(pools, name))
            if gpus and gpus < degree:
                raise ValueError(f"pools.{name}: {gpus:g} GPU(s) per instance cannot hold tensor_parallel_size "
                                 f"{degree}")
        return self

    @classmethod
    def load(cls, path: Path | None = None, overrides: dict | None = None) -> "ServeConfig":
        """File, then environment, then `overrides` (nested, from CLI flags)."""
        data: dict = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping at the top level")
            data = loaded
        for layer in (env_overrides(), overrides or {}):
            data = _merge(_counts_as_pools(data), _counts_as_pools(layer))
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration:\n{exc}") from exc


# Environment variable -> path in the config tree.
ENV_VARS: dict[str, tuple[str, str]] = {
    "PDSERVE_MODEL": ("engine", "model"),
    "PDSERVE_API_KEY": ("gateway", "api_key"),
    "PDSERVE_HOST": ("gateway", "host"),
    "PDSERVE_PORT": ("gateway", "port"),
    "PDSERVE_RAY_ADDRESS": ("ray", "address"),
}


def env_overrides(environ: dict[str, str] | None = None) -> dict:
    """The only reader of configuration from the environment."""
    environ = dict(os.environ) if environ is None else environ
    out: dict = {}
    for var, (section, key) in ENV_VARS.items():
        if environ.get(var):
            out.setdefault(section, {})[key] = environ[var]
    return out


def _counts_as_pools(layer: dict) -> dict:
    """`pools.decode: 2` as `{instances: 2}`, so a count from the CLI keeps the file's resources for that pool."""
    pools = layer.get("pools")
    if not isinstance(pools, dict):
        return layer
    return {**layer, "pools": {key: _pool(value) if key in ("mixed", "prefill", "decode") else value
                               for key, value in pools.items()}}


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
