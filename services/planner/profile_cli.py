"""Measure an engine's prefill and decode-step times into a profile CSV.

Runs the model in vLLM's offline engine (`vllm.LLM`, in this process; vLLM
starts its engine core in a spawned subprocess, which `pdserve`'s entry
point is safe for) and writes Splitwise's profile format, which
`pdserve plan --profile` reads: prefill time over prompt sizes and batch
sizes, decode step time over batch sizes and context lengths. Any model,
any machine: on CPU, KV memory is a fraction of host memory
(--gpu-memory-utilization, default 0.15 there).

Example:
  pdserve profile --output services/planner/profiles/demo_cpu.csv --hardware cpu-2core
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF model directory or hub id (default: the demo model).")
    parser.add_argument("--model-name", default=None, help="`model` column in the CSV (default: the folder name).")
    parser.add_argument("--hardware", default="cpu", help="`hardware` column: a name for this machine type.")
    parser.add_argument("--output", required=True, help="CSV to write.")
    parser.add_argument("--prompt-sizes", type=_ints, default=[16, 64, 128, 256, 512, 1024])
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--ref-prompt", type=int, default=128, help="Prompt size of the batch-size sweep.")
    parser.add_argument("--decode-tokens", type=int, default=32, help="Output tokens per decode measurement.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM's; on CPU the fraction of host memory for KV (default 0.15 there).")


def _vllm_generate(args, max_len: int, max_batch_tokens: int, max_seqs: int):
    import time

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    util = args.gpu_memory_utilization or (0.15 if current_platform.is_cpu() else 0.9)
    llm = LLM(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel,
              gpu_memory_utilization=util, max_model_len=max_len, max_num_batched_tokens=max_batch_tokens,
              max_num_seqs=max_seqs, enable_prefix_caching=False, enforce_eager=True, seed=0)

    def generate(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        t0 = time.perf_counter()
        llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - t0

    vocab = llm.llm_engine.model_config.get_vocab_size()
    return generate, vocab


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.planner.errors import PlannerError
    from pdserve.planner.profiler import ProfilePlan, Profiler, write_profile

    if args.model is None:
        from pdserve.shared.config import demo_model_path

        args.model = str(demo_model_path())
    name = args.model_name or Path(args.model.rstrip("/")).name
    plan = ProfilePlan(args.prompt_sizes, args.batch_sizes, args.ref_prompt, args.decode_tokens, args.repeats)
    try:
        plan.check()
        max_prompt = max(plan.prompt_sizes + [plan.ref_prompt])
        # one step must hold the largest prefill batch, or chunked prefill would split it across steps
        batch_tokens = max(max_prompt, plan.ref_prompt * max(plan.batch_sizes)) + max(plan.batch_sizes)
        generate, vocab = _vllm_generate(args, max_prompt + plan.decode_tokens + 8, batch_tokens,
                                         max(plan.batch_sizes))
        plan.vocab_size = vocab
        print(f"profiling {name} on {args.hardware}: {len(plan.prompt_sizes)} prompt sizes, "
              f"{len(plan.batch_sizes)} batch sizes, {plan.repeats} repeats")
        rows = Profiler(generate, plan, name, args.hardware, args.tensor_parallel).run()
    except PlannerError as exc:
        print(f"pdserve profile: error: {exc}", file=sys.stderr)
        return 2
    path = write_profile(args.output, rows)
    print(f"wrote {len(rows)} rows to {path}")
    return 0
