"""Benchmark any OpenAI-compatible endpoint (pdserve, `vllm serve`, anyone's) with
real or synthetic traffic, and report latency, throughput and goodput.

Traffic goes only to --base-url, and every run stops by itself: a trace ends,
and synthetic load needs --duration and/or --num-requests.

Workloads: replay of the Azure LLM inference traces from the Splitwise paper
(--trace code|conv, real inter-arrival times or rescaled with --rate; prompts of
exactly ContextTokens tokens of the model's tokenizer, max_tokens =
GeneratedTokens with ignore_eos), a CSV of your own with the same columns,
or synthetic lengths (--input-len/--output-len/--length-dist). Arrivals: the
trace's, Poisson or gamma at --rate, or a closed loop at --concurrency.
Named traces are found in --trace-dir, $PDSERVE_TRACE_DIR or ~/.cache/pdserve/traces,
else downloaded from Azure/AzurePublicDataset and checked by sha256 (CC-BY 4.0;
Patel et al., "Splitwise", ISCA 2024).

Outputs in --output-dir: result.json (vLLM `bench serve` key names), requests.csv
(one row per request), latency_cdf.png; with --sweep-rates one sub-directory
per rate plus sweep.json, sweep_throughput.png and sweep_slo_attainment.png.

Compare runs:  pdserve bench compare RUN_A RUN_B [...] [--output-dir DIR]

Examples:
  pdserve bench --base-url http://127.0.0.1:8000 --model demo --tokenizer ./model \\
      --trace conv --rate 0.5 --duration 120 --slo-ttft-ms 500 --slo-tpot-ms 50 --output-dir out/conv
  pdserve bench --base-url http://127.0.0.1:8000 --model demo --input-len 256 --output-len 64 \\
      --arrival gamma --burstiness 0.5 --sweep-rates 0.5,1,2 --duration 60 --slo-ttft-x 5 --output-dir out/sweep
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _target_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("target")
    g.add_argument("--base-url", help="base URL of the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    g.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"],
                   help="API the requests go to (default: %(default)s); both are streamed")
    g.add_argument("--model", help="model name sent in each request")
    g.add_argument("--tokenizer", help="tokenizer (hub name or local dir) that sizes the prompts (default: --model)")
    g.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY); never written to the results")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="fail a request still running after S seconds (default: %(default)s)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default: the server's, 1.0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (default: the server's)")
    g.add_argument("--top-k", type=int, help="top-k sampling (default: the server's)")
    g.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                   help="more request fields as a JSON object, merged into every request (e.g. '{\"seed\": 1}')")
    g.add_argument("--no-preflight", action="store_true",
                   help="skip the one small request that checks the server before the run")


def _workload_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--trace", help="'code' or 'conv' (Azure LLM inference traces) or a CSV path with "
                                   "TIMESTAMP,ContextTokens,GeneratedTokens; omit for synthetic lengths")
    g.add_argument("--trace-dir", type=Path, help="directory holding AzureLLMInferenceTrace_{code,conv}.csv")
    g.add_argument("--trace-start", type=float, default=0.0, metavar="S", help="skip the first S s of the trace")
    g.add_argument("--input-len", type=int, default=1024, help="synthetic: mean prompt tokens (default: %(default)s)")
    g.add_argument("--output-len", type=int, default=128, help="synthetic: mean output tokens (default: %(default)s)")
    g.add_argument("--length-dist", default="fixed", choices=["fixed", "uniform", "exponential", "lognormal"],
                   help="synthetic length distribution (default: %(default)s)")
    g.add_argument("--length-spread", type=float, default=0.5,
                   help="uniform: +/- fraction of the mean; lognormal: sigma (default: %(default)s)")
    g.add_argument("--max-input-tokens", type=int, help="clip prompt lengths (e.g. to the model's context)")
    g.add_argument("--max-output-tokens", type=int, help="clip output lengths")
    g.add_argument("--shared-prefix-fraction", type=float, default=0.0,
                   help="fraction of requests whose prompt starts with a shared prefix (default: 0)")
    g.add_argument("--shared-prefix-len", type=int, default=0, help="shared prefix length in tokens (default: 0)")
    g.add_argument("--shared-prefix-groups", type=int, default=1, help="number of distinct prefixes (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="seed for lengths, arrivals and prompts (default: 0)")


def _load_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("arrivals and stopping")
    g.add_argument("--arrival", choices=["trace", "poisson", "gamma", "closed"],
                   help="default: trace with --trace, closed with --concurrency, else poisson")
    g.add_argument("--rate", type=float, help="requests/s; with a trace, rescales its real inter-arrival times")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape: 1 = Poisson, <1 burstier, >1 smoother (default: 1; not 1 implies gamma)")
    g.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    g.add_argument("--duration", type=float, metavar="S", help="send no request after S seconds")
    g.add_argument("--num-requests", type=int, metavar="N", help="send at most N requests")
    g.add_argument("--sweep-rates", type=_floats, metavar="R1,R2,...", help="one run per request rate")


def _slo_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SLOs and goodput (a request is good when it meets all given SLOs)")
    for name, what in (("ttft", "time to first token"), ("tpot", "time per output token"),
                       ("e2el", "end-to-end latency")):
        g.add_argument(f"--slo-{name}-ms", type=float, metavar="MS", help=f"{what} SLO in milliseconds")
        g.add_argument(f"--slo-{name}-x", type=float, metavar="X",
                       help=f"{what} SLO as X times the unloaded {name.upper()} measured at the start")
    g.add_argument("--unloaded-probes", type=int, default=3,
                   help="sequential requests that measure unloaded latency (default: %(default)s)")
    g.add_argument("--slo-send", action="store_true",
                   help="send the TTFT/TPOT SLOs with every request (x-slo-ttft-ms, x-slo-tpot-ms): an SLO-aware "
                        "server admits against them; 429s count as rejected")
    g.add_argument("--header", action="append", default=[], metavar="NAME=VALUE", dest="headers",
                   help="an HTTP header on every request, e.g. x-priority=batch (repeatable)")


def _output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path("bench-out"), help="default: %(default)s")
    g.add_argument("--label", help="name of the run in tables and charts")
    g.add_argument("--percentiles", type=_floats, default=[50.0, 90.0, 99.0], metavar="P1,P2,...",
                   help="percentiles to report (default: 50,90,99)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-charts", action="store_true", help="write no PNG charts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for add in (_target_args, _workload_args, _load_args, _slo_args, _output_args):
        add(parser)
    sub = parser.add_subparsers(dest="bench_command", metavar="{compare}", required=False)
    cmp = sub.add_parser("compare", help="put several runs on the same charts and print ratios",
                         description="Compare `pdserve bench` output directories (the first is the baseline).")
    cmp.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    cmp.add_argument("--labels", type=lambda s: s.split(","), help="comma-separated names, one per run")
    cmp.add_argument("--output-dir", dest="compare_output_dir", type=Path, default=Path("bench-out/compare"),
                     help="where the comparison charts go (default: %(default)s)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _headers(items: list[str]) -> dict[str, str]:
    from pdserve.loadgen.errors import BenchConfigError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise BenchConfigError(f"--header {item!r} is not NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def _arrival_kind(args: argparse.Namespace) -> str:
    if args.arrival:
        return args.arrival
    if args.concurrency is not None:
        return "closed"
    if args.trace:
        return "trace"
    return "gamma" if args.burstiness != 1.0 else "poisson"


def build_config(args: argparse.Namespace):
    """BenchConfig from parsed arguments; raises BenchConfigError on missing essentials."""
    from pdserve.loadgen.config import (ArrivalConfig, BenchConfig, SloConfig, StopConfig, TargetConfig,
                                        WorkloadConfig)
    from pdserve.loadgen.errors import BenchConfigError

    if not args.base_url or not args.model:
        raise BenchConfigError("--base-url and --model are required")
    target = TargetConfig(base_url=args.base_url, endpoint=args.endpoint, model=args.model,
                          api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                          request_timeout_s=args.request_timeout, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, extra_body=args.extra_body,
                          headers=_headers(args.headers))
    workload = WorkloadConfig(
        trace=args.trace, trace_dir=args.trace_dir, trace_start_s=args.trace_start, input_len=args.input_len,
        output_len=args.output_len, length_dist=args.length_dist, length_spread=args.length_spread,
        max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens,
        shared_prefix_fraction=args.shared_prefix_fraction, shared_prefix_len=args.shared_prefix_len,
        shared_prefix_groups=args.shared_prefix_groups, tokenizer=args.tokenizer or args.model, seed=args.seed)
    arrivals = ArrivalConfig(kind=_arrival_kind(args), rate=args.rate, burstiness=args.burstiness,
                             concurrency=args.concurrency)
    slo = SloConfig(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, e2el_ms=args.slo_e2el_ms,
                    ttft_x=args.slo_ttft_x, tpot_x=args.slo_tpot_x, e2el_x=args.slo_e2el_x,
                    unloaded_probes=args.unloaded_probes, send=args.slo_send)
    return BenchConfig(target=target, workload=workload, arrivals=arrivals,
                       stop=StopConfig(duration_s=args.duration, num_requests=args.num_requests), slo=slo,
                       percentiles=args.percentiles, output_dir=args.output_dir, sweep_rates=args.sweep_rates,
                       label=args.label, progress=not args.no_progress, charts=not args.no_charts,
                       preflight=not args.no_preflight)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pdserve.loadgen.errors import LoadgenError

    try:
        if getattr(args, "bench_command", None) == "compare":
            from pdserve.loadgen.compare import compare

            compare(args.runs, args.compare_output_dir, args.labels)
            return 0
        from pdserve.loadgen.runner import execute

        results = execute(build_config(args))
    except LoadgenError as exc:
        print(f"pdserve bench: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"pdserve bench: invalid options: {exc}", file=sys.stderr)
        return 2
    # Results are written either way; a run where nothing succeeded is still a failure.
    return 0 if all(r["completed"] > 0 for r in results) else 1
