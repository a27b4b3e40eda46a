"""An abort storm against the default `pdserve serve`: does the pair hold, and serve as before, after it?

Lifecycle: start `pdserve serve` (one prefill + one decode instance) -> a
normal closed-loop batch (throughput before) -> the storm: a burst at
`--storm-factor` times the normal concurrency in which `--abort-share` of the
requests are cancelled by their clients at uniform-random moments -> the time
until both instances hold no request and no KV block -> the same normal batch
again (throughput after) -> stop. Prints the figures and the after/before ratio.

    python scripts/bench_abort_storm.py                    # 4x burst, 90% cancelled
    python scripts/bench_abort_storm.py --storm 200 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import httpx

from pdserve.serve_process import ServeProcess

VOCAB = 4096


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(length)]


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
               abort_after: float | None) -> tuple[str, int]:
    """("ok" | "aborted" | "failed", tokens streamed) for one streamed greedy request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    tokens = 0

    async def call() -> str:
        nonlocal tokens
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return "failed"
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and '"error"' in line:
                    return "failed"
                if line.startswith("data: {"):
                    tokens += 1
        return "ok"

    try:
        return await asyncio.wait_for(call(), timeout=abort_after), tokens
    except asyncio.TimeoutError:
        return ("aborted" if abort_after is not None else "failed"), tokens


async def _batch(url: str, plan: list[tuple[list[int], int, float | None]], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def gated(item):
            async with gate:
                return await _one(client, url, *item)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(item) for item in plan))
        wall = time.perf_counter() - start
    outcomes = [r for r, _ in results]
    return {"wall_s": wall, "ok": outcomes.count("ok"), "aborted": outcomes.count("aborted"),
            "failed": outcomes.count("failed"), "tokens": sum(t for _, t in results),
            "tokens_per_s": sum(t for _, t in results) / wall}


def _held(url: str) -> dict:
    stats = httpx.get(url + "/health", timeout=10).json()["instances"]
    return {s["instance_id"]: (s["in_flight"] + s["num_running"] + s["num_waiting"], s["kv_usage"]) for s in stats}


def _time_to_idle(url: str, limit_s: float = 60.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if all(n == 0 and kv == 0.0 for n, kv in _held(url).values()):
            return time.perf_counter() - start
        time.sleep(0.05)
    raise RuntimeError(f"still held after {limit_s} s: {_held(url)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--normal", type=int, default=24, help="requests in each normal batch")
    ap.add_argument("--concurrency", type=int, default=4, help="in flight in a normal batch")
    ap.add_argument("--storm", type=int, default=120, help="requests in the storm")
    ap.add_argument("--storm-factor", type=float, default=4.0, help="storm concurrency / normal concurrency")
    ap.add_argument("--abort-share", type=float, default=0.9, help="share of storm requests cancelled")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    normal = [(_prompt(rng, rng.choice([64, 256, 512, 1024])), 64, None) for _ in range(args.normal)]
    # Every request fits the 2,048-token context: a failure here is the server's, not a 400 for length.
    storm = [(_prompt(rng, rng.choice([16, 256, 1024, 1700])), 256,
              rng.uniform(0.0, 3.0) if rng.random() < args.abort_share else None) for _ in range(args.storm)]
    server = ServeProcess(["--max-model-len", "2048"], Path(tempfile.mkdtemp()) / "serve.log")
    try:
        server.wait_ready()
        before = asyncio.run(_batch(server.url, normal, args.concurrency))
        stormed = asyncio.run(_batch(server.url, storm, max(1, int(args.concurrency * args.storm_factor))))
        idle_s = _time_to_idle(server.url)
        after = asyncio.run(_batch(server.url, normal, args.concurrency))
    finally:
        server.terminate()
    print(f"storm: {args.storm} requests at concurrency {int(args.concurrency * args.storm_factor)}: "
          f"{stormed['aborted']} cancelled by their clients, {stormed['ok']} completed, {stormed['failed']} failed")
    print(f"both instances idle (0 requests, 0 KV blocks) {idle_s:.2f} s after the storm's last request ended")
    print("| batch | completed | failed | wall s | tokens/s |")
    print("|---|---|---|---|---|")
    for name, run in (("before the storm", before), ("after the storm", after)):
        print(f"| {name} | {run['ok']}/{args.normal} | {run['failed']} | {run['wall_s']:.1f} | {run['tokens_per_s']:.1f} |")
    print(f"throughput after / before: {after['tokens_per_s'] / before['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
