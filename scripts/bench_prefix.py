"""Prefix-aware routing against least_loaded on a multi-turn workload, side by side (issue 15).

Lifecycle: for each policy, start `pdserve serve` (1 prefill + 2 decode
instances by default), replay the same conversations, read the gateway's
metrics, stop; then print the two columns.

Workload: `--conversations` conversations run concurrently; each has
`--turns` turns sent one after the other, and every turn's prompt is the
previous turn's prompt plus `--turn-tokens` new tokens (the history is
resent, as chat clients do; the model's answers are left out of the history,
so the shared part is exactly the previous prompt). With 4 turns of 256
tokens, 60% of all prompt tokens are history.

Reported per policy: TTFT p50/p99 (client side, streamed), throughput,
prompt tokens the prefill pool computed and reused (its prefix-cache hits,
`pdserve:prefix_cache_*`), KV bytes P sent and the bytes D's own prefix
cache spared (`pdserve:kv_transfer_bytes_saved_total`), and the sum of
`usage.prompt_tokens_details.cached_tokens` (which must equal the hits).

    python scripts/bench_prefix.py
    python scripts/bench_prefix.py --conversations 8 --turns 4 --turn-tokens 256 --decode 2
    python scripts/bench_prefix.py --prefill 2 --policies least_loaded prefix_aware prefix_aware:sent
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import httpx

from pdserve.serve_process import ServeProcess

VOCAB = 4096


def one_turn(url: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, cached tokens from usage) of one streamed greedy request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, cached = time.perf_counter(), None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    if first is None or cached is None:
        raise RuntimeError("no token or no usage came back")
    return first - start, cached


def replay(url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    turns = [[[rng.randrange(3, VOCAB) for _ in range(args.turn_tokens)] for _ in range(args.turns)]
             for _ in range(args.conversations)]
    ttfts: list[float] = []
    cached = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def conversation(parts: list[list[int]]) -> None:
        history: list[int] = []
        try:
            for part in parts:
                history = history + part
                ttft, hit = one_turn(url, history, args.max_tokens)
                with lock:
                    ttfts.append(ttft)
                    cached[0] += hit
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=conversation, args=(parts,)) for parts in turns]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.timeout_s)
    wall = time.perf_counter() - start
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"{len(errors)} conversation(s) failed: {errors[:1]}")
    ttfts.sort()
    return {"ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "requests_per_s": len(ttfts) / wall, "usage_cached_tokens": cached[0]}


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[-1])
    return total


def server_figures(url: str) -> dict:
    time.sleep(2.0)  # one stats refresh after the last request
    text = httpx.get(url + "/metrics", timeout=30).text
    queries = metric_sum(text, "pdserve:prefix_cache_queries_total", role="prefill")
    hits = metric_sum(text, "pdserve:prefix_cache_hits_total", role="prefill")
    sent = metric_sum(text, "pdserve:kv_transfer_bytes", role="prefill")
    saved = metric_sum(text, "pdserve:kv_transfer_bytes_saved_total", role="prefill")
    return {"prefill_tokens_computed": queries - hits, "prefill_tokens_reused": hits,
            "prefill_hit_rate": hits / queries if queries else 0.0, "kv_bytes_sent": sent, "kv_bytes_saved": saved,
            "decode_hit_rate": saved / (sent + saved) if sent + saved else 0.0,
            # What the router's prefix index said the chosen prefill instance held (0 for other policies).
            "index_predicted_prefill_hits": metric_sum(text, "pdserve:prefix_index_hit_tokens", role="prefill",
                                                       kind="hit"),
            "index_hash_mismatches": metric_sum(text, "pdserve:prefix_index", counter="subscriber_hash_mismatch"),
            "handoffs": metric_sum(text, "pdserve:handoffs", outcome="handoffs"),
            "decode_alone": metric_sum(text, "pdserve:handoffs", outcome="decode_alone")}


def run_policy(policy: str, args: argparse.Namespace) -> dict:
    max_len = args.turns * args.turn_tokens + args.max_tokens + 64
    name, _, index = policy.partition(":")  # prefix_aware:sent = the approximate index
    flags = ["--prefill", str(args.prefill), "--decode", str(args.decode), "--routing-policy", name,
             *(["--prefix-index", index] if index else []),
             "--max-model-len", str(max_len), "--kv-cache-memory-bytes", str(args.kv_bytes),
             "--log-level", "warning"]
    server = ServeProcess(flags, Path(args.log_dir) / f"bench_prefix_{name}_{index or 'default'}.log")
    try:
        server.wait_ready()
        one_turn(server.url, [5] * 32, 2)  # warm-up (32 tokens: not a prefix of any conversation)
        return {**replay(server.url, args), **server_figures(server.url)}
    finally:
        server.terminate()


ROWS = [("TTFT p50 ms", "ttft_p50", 1e3), ("TTFT p99 ms", "ttft_p99", 1e3), ("requests/s", "requests_per_s", 1),
        ("prefill tokens computed", "prefill_tokens_computed", 1), ("prefill tokens reused", "prefill_tokens_reused", 1),
        ("prefill hit rate", "prefill_hit_rate", 1), ("KV MiB sent", "kv_bytes_sent", 1 / 2**20),
        ("KV MiB saved (D held)", "kv_bytes_saved", 1 / 2**20), ("decode hit rate", "decode_hit_rate", 1),
        ("index: predicted P hits", "index_predicted_prefill_hits", 1),
        ("index: hash mismatches", "index_hash_mismatches", 1),
        ("handoffs", "handoffs", 1), ("decode alone", "decode_alone", 1),
        ("usage cached_tokens", "usage_cached_tokens", 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["least_loaded", "prefix_aware"],
                        help="routing policies; prefix_aware:sent uses the approximate index")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=256 << 20, help="KV cache bytes per instance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="longest wait for the conversations")
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = {policy: run_policy(policy, args) for policy in args.policies}
    print(f"\n{'':<26}" + "".join(f"{p:>16}" for p in args.policies))
    for label, key, scale in ROWS:
        cells = "".join(f"{results[p][key] * scale:>16.3f}" if isinstance(results[p][key], float)
                        else f"{results[p][key] * scale:>16}" for p in args.policies)
        print(f"{label:<26}{cells}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
