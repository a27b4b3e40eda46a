"""Serve a model behind an OpenAI-compatible gateway.

With no arguments: a local Ray, the bundled demo model, one prefill and one
decode engine instance on CPU (the KV cache of every request moves from the
first to the second), and the gateway on http://127.0.0.1:8000. `--mode
colocated` runs one `mixed` instance instead (prefill and decode together). Settings come from
field defaults, then --config FILE (YAML, same tree as `pdserve.shared.config`),
then PDSERVE_* environment variables, then these flags. Ctrl-C or SIGTERM stops
the gateway, the engines and the local Ray.

Example config file:

  engine: {model: /models/llama, dtype: bfloat16, max_model_len: 8192}
  pools: {mixed: 2, gpus_per_instance: 1}
  gateway: {port: 8080, api_key: secret}
  ray: {address: auto}
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger("pdserve.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (flags override it).")
    g = parser.add_argument_group("model and engine (passed to vLLM)")
    g.add_argument("--model", help="Local HF-format directory or hub id (default: the bundled demo model).")
    g.add_argument("--served-model-name", help="Name clients send as `model` (default: the model's folder name).")
    g.add_argument("--tokenizer", help="Tokenizer directory or hub id (default: the model's).")
    g.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default: auto).")
    g.add_argument("--max-model-len", type=int, help="Context length in tokens (default: the model's).")
    g.add_argument("--block-size", type=int, help="KV-cache block size in tokens.")
    g.add_argument("--kv-cache-memory-bytes", type=int, help="Bytes of KV cache per instance.")
    g.add_argument("--gpu-memory-utilization", type=float,
                   help="Fraction of device memory (on CPU: host memory) per instance (CPU default 0.15).")
    g.add_argument("--max-num-seqs", type=int, help="Most requests in one engine batch.")
    g.add_argument("--max-num-batched-tokens", type=int, help="Most tokens in one engine step.")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="Reuse the KV cache of shared prompt prefixes.")
    g.add_argument("--seed", type=int, help="Engine seed (default 0).")
    g.add_argument("--engine-arg", action="append", default=[], metavar="NAME=JSON",
                   help="Any other vLLM engine argument by its Python name, value as JSON "
                        "(e.g. --engine-arg max_logprobs=50). Repeatable.")
    p = parser.add_argument_group("pools")
    p.add_argument("--mode", choices=["disaggregated", "colocated"],
                   help="disaggregated (default): prefill and decode pools with KV handoff; "
                        "colocated: mixed instances only (--mixed of them, default 1).")
    p.add_argument("--mixed", type=int, help="Instances running prefill and decode together (default 0).")
    p.add_argument("--prefill", type=int, help="Prefill instances (default 1).")
    p.add_argument("--decode", type=int, help="Decode instances (default 1).")
    p.add_argument("--cpus-per-instance", type=float, help="Ray CPUs each instance reserves (default 1).")
    p.add_argument("--gpus-per-instance", type=float, help="Ray GPUs each instance reserves (default 0).")
    w = parser.add_argument_group("gateway")
    w.add_argument("--host", help="Listen address (default 127.0.0.1).")
    w.add_argument("--port", type=int, help="Listen port (default 8000; 0 picks a free one).")
    w.add_argument("--api-key", help="Require `Authorization: Bearer KEY` (or set PDSERVE_API_KEY).")
    w.add_argument("--routing-policy", "--policy", dest="routing_policy",
                   help="round_robin, least_loaded (default), kv_jsq, splitwise, prefix_aware or slo_aware "
                        "(placement and admission against each request's SLO; see the README's API section).")
    w.add_argument("--prefix-index", choices=["events", "sent"],
                   help="prefix_aware: follow the engines' KV events (default) or the router's own placements.")
    w.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="Log level (default info).")
    r = parser.add_argument_group("ray")
    r.add_argument("--address", help="Join this Ray cluster (e.g. auto); default: start a local one.")
    r.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray (default: enough for every instance).")


_FLAG_PATHS = {
    "model": ("engine", "model"), "served_model_name": ("engine", "served_model_name"),
    "tokenizer": ("engine", "tokenizer"), "dtype": ("engine", "dtype"),
    "max_model_len": ("engine", "max_model_len"), "block_size": ("engine", "block_size"),
    "kv_cache_memory_bytes": ("engine", "kv_cache_memory_bytes"),
    "gpu_memory_utilization": ("engine", "gpu_memory_utilization"),
    "max_num_seqs": ("engine", "max_num_seqs"), "max_num_batched_tokens": ("engine", "max_num_batched_tokens"),
    "enable_prefix_caching": ("engine", "enable_prefix_caching"), "seed": ("engine", "seed"),
    "mixed": ("pools", "mixed"), "prefill": ("pools", "prefill"), "decode": ("pools", "decode"),
    "cpus_per_instance": ("pools", "cpus_per_instance"), "gpus_per_instance": ("pools", "gpus_per_instance"),
    "host": ("gateway", "host"), "port": ("gateway", "port"), "api_key": ("gateway", "api_key"),
    "routing_policy": ("gateway", "routing_policy"), "log_level": ("gateway", "log_level"),
    "prefix_index": ("prefix_routing", "index"),
    "address": ("ray", "address"), "ray_num_cpus": ("ray", "num_cpus"),
}


def flag_overrides(args: argparse.Namespace) -> dict:
    """The flags the user gave, as a nested dict in the config tree's shape."""
    from pdserve.shared.errors import ConfigError

    out: dict = {}
    for flag, (section, key) in _FLAG_PATHS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    extra = {}
    for item in args.engine_arg:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--engine-arg needs NAME=VALUE, got {item!r}")
        try:
            extra[name] = json.loads(raw)
        except ValueError:
            extra[name] = raw  # a bare string
    if extra:
        out.setdefault("engine", {})["engine_args"] = extra
    if args.mode == "colocated":
        pools = out.setdefault("pools", {})
        if pools.get("prefill") or pools.get("decode"):
            raise ConfigError("--mode colocated runs mixed instances only; drop --prefill/--decode")
        pools.update(prefill=0, decode=0, mixed=pools.get("mixed") or 1)
    return out


def run(args: argparse.Namespace) -> int:
    from pdserve.shared.config import ServeConfig
    from pdserve.shared.errors import PdserveError

    try:
        config = ServeConfig.load(args.config, flag_overrides(args))
    except PdserveError as exc:
        print(f"pdserve serve: {exc.message}")
        return 2
    logging.basicConfig(level=config.gateway.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pdserve.launcher import serve

    try:
        return serve(config)
    except PdserveError as exc:
        logger.error("%s", exc.message)
        return 1
