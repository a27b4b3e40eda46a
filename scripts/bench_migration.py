"""Downtime of live migration between two decode engines, by context length: a printed table.

Two vLLM-CPU engines (`AsyncLLM`, each with its engine-core process, pdserve's
KV connector over TCP, the demo model) in this process. For each context
length a greedy request decodes on the source S; after `--warm` tokens it is
moved to the target T two ways, each measured from the moment S is told to
stop to T's first new token (what a client's stream would wait):

  stop-and-copy  S stops and holds the KV (`pdserve_migrate_stop`), T is
                 admitted with prompt + outputs and reserves blocks, S pushes
                 the KV into them (`pdserve_migrate_send`), T computes the
                 last token and samples.
  recompute      S stops and frees the KV (`pdserve_migrate_release`), T
                 computes prompt + outputs from scratch.

Beside them: one decode step on S at that context (mean inter-token time of
the tokens before the move). Multi-stage migration is not built: its row is
absent. Nothing is asserted; run it under the engine lock:

  flock /tmp/pdserve-engines.lock timeout 900 .venv/bin/python scripts/bench_migration.py
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

from pdserve.kv_transfer.connector import EXTRA_KEY
from pdserve.kv_transfer.migration import StoppedRequest
from pdserve.kv_transfer.reservations import ReservationInbox
from pdserve.shared.config import KVTransferConfig
from pdserve.worker.migration import MIGRATE_RELEASE, MIGRATE_SEND, MIGRATE_STOP, target_params, worker_call

MODEL = str(Path(__file__).resolve().parents[1] / "services" / "demo_model")


def _engine(role: str, max_len: int, kv_bytes: int):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=MODEL, max_model_len=max_len, kv_cache_memory_bytes=kv_bytes, enforce_eager=True, seed=0,
        kv_transfer_config={
            "kv_connector": "PDConnector", "kv_connector_module_path": "pdserve.kv_transfer.connector",
            "kv_role": "kv_both", "engine_id": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {EXTRA_KEY: KVTransferConfig(
                transfer_timeout_s=60, bind_host="127.0.0.1").model_dump(mode="json"), "instance_id": role},
        })
    return AsyncLLM.from_engine_args(args)


async def _first_token(engine, prompt: list[int], params, rid: str) -> tuple[float, list[int]]:
    """Time of the first output, and all tokens (the request runs to its end)."""
    from vllm.inputs import TokensPrompt

    first, tokens = None, []
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, rid):
        if first is None and out.outputs[0].token_ids:
            first = time.monotonic()
        tokens = list(out.outputs[0].token_ids)
    return first or time.monotonic(), tokens


async def _decode_until(engine, prompt: list[int], params, rid: str, warm: int) -> tuple[asyncio.Task, float]:
    """Start `rid` on `engine`; return once it produced `warm` tokens, with its mean decode step."""
    from vllm.inputs import TokensPrompt

    stamps: list[float] = []
    reached = asyncio.Event()

    async def run() -> None:
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, rid):
            stamps.append(time.monotonic())
            if len(out.outputs[0].token_ids) >= warm:
                reached.set()
                await asyncio.Event().wait()  # keeps the stream open: the move stops it in the core

    task = asyncio.create_task(run())
    await reached.wait()
    steps = [b - a for a, b in zip(stamps[2:], stamps[3:])]  # past the prefill and the first steps
    return task, statistics.median(steps) if steps else float("nan")


async def _move(source, target, inbox: ReservationInbox, prompt: list[int], params, rid: str, warm: int,
                copy: bool) -> tuple[float, float, int]:
    """(downtime s, decode step s, blocks sent) of one move of `rid` from `source` to `target`."""
    task, step = await _decode_until(source, prompt, params, rid, warm)
    held: dict[str, str] = {}
    started = time.monotonic()
    answer = await worker_call(source, held, MIGRATE_STOP, rid)
    stopped = StoppedRequest(rid, answer["prompt_token_ids"], answer["output_token_ids"],
                             answer["num_computed_tokens"])
    tid = f"{rid}-t"
    continuation = stopped.prompt_token_ids + stopped.output_token_ids
    tparams = target_params(params, len(prompt), stopped, tid, inbox.address, 60.0)
    blocks = 0
    if copy:
        first = asyncio.create_task(_first_token(target, continuation, tparams, tid))
        while (reservation := inbox.poll(tid)) is None:
            await inbox.wait(tid, 0.5)
        blocks = len(reservation.decode_block_ids)
        await worker_call(source, held, MIGRATE_SEND, rid, reservation.to_dict())
    else:
        await worker_call(source, held, MIGRATE_RELEASE, rid)
        tparams.extra_args.pop("kv_transfer_params")
        first = asyncio.create_task(_first_token(target, continuation, tparams, tid))
    at, _ = await first
    await source.abort(rid)
    task.cancel()
    return at - started, step, blocks


async def main(args: argparse.Namespace) -> None:
    from vllm import SamplingParams

    source, target = _engine("mig-source", args.max_len, args.kv_bytes), _engine("mig-target", args.max_len,
                                                                                 args.kv_bytes)
    inbox = ReservationInbox("127.0.0.1")
    inbox.start()
    rows = []
    try:
        for context in args.contexts:
            prompt_len = min(context, args.max_len - args.warm - 8) - args.warm
            rng = random.Random(context)
            params = SamplingParams(max_tokens=args.warm + 4, temperature=0.0, ignore_eos=True)
            results = {}
            for kind in ("copy", "recompute"):
                runs = []
                for rep in range(args.repeats):
                    prompt = [rng.randrange(3, 4096) for _ in range(prompt_len)]  # fresh: no prefix-cache hit
                    runs.append(await _move(source, target, inbox, prompt, params, f"{kind}-{context}-{rep}",
                                            args.warm, kind == "copy"))
                results[kind] = runs
            copy_ms = statistics.median(r[0] for r in results["copy"]) * 1e3
            recompute_ms = statistics.median(r[0] for r in results["recompute"]) * 1e3
            step_ms = statistics.median(r[1] for r in results["copy"] + results["recompute"]) * 1e3
            rows.append((prompt_len + args.warm, copy_ms, recompute_ms, step_ms, results["copy"][0][2]))
            print(f"measured: context {rows[-1][0]}: stop-and-copy {copy_ms:.1f} ms, recompute {recompute_ms:.1f} ms, "
                  f"decode step {step_ms:.1f} ms", flush=True)
    finally:
        inbox.close()
        source.shutdown()
        target.shutdown()
    print(f"\nmedian of {args.repeats}; downtime = source told to stop -> target's first token")
    print(f"{'context':>8} {'blocks':>6} {'stop-and-copy ms':>17} {'recompute ms':>13} {'decode step ms':>15} "
          f"{'copy/step':>9} {'recompute/copy':>14}")
    for context, copy_ms, recompute_ms, step_ms, blocks in rows:
        print(f"{context:>8} {blocks:>6} {copy_ms:>17.1f} {recompute_ms:>13.1f} {step_ms:>15.1f} "
              f"{copy_ms / step_ms:>9.2f} {recompute_ms / copy_ms:>14.2f}")
    copies = [r[1] for r in rows]
    print(f"stop-and-copy max/min over the contexts: {max(copies) / min(copies):.2f} (multi-stage: not built)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    parser.add_argument("--warm", type=int, default=16, help="tokens decoded on the source before the move")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=4096, help="the demo model's positions end at 4096")
    parser.add_argument("--kv-bytes", type=int, default=256 << 20)
    asyncio.run(main(parser.parse_args()))
