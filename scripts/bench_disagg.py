"""Disaggregated vs colocated serving, side by side in one run on one machine.

Lifecycle: start `pdserve serve --mode colocated`, measure, stop; start
`pdserve serve` (one prefill + one decode instance), measure, stop; print
TTFT and TPOT per prompt length with the ratio disaggregated / colocated, and
the share of KV transfer time left exposed (not overlapped with the prompt's
compute) from the prefill instance's connector metrics. The transports'
bandwidth beside a memory copy is `scripts/bench_kv_transport.py`.

Requests are sent one at a time (an unloaded server: the latency each phase
costs, not queueing), streamed, greedy, with `ignore_eos`.

    python scripts/bench_disagg.py                        # 256, 1024, 2048-token prompts
    python scripts/bench_disagg.py --lengths 256 1024 --requests 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx

from pdserve.serve_process import ServeProcess

VOCAB = 4096


def one_request(url: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds, as vLLM's benchmark defines them, for one streamed request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            tokens += 1 if chunk.get("choices") else 0
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("no token came back")
    return first - start, (end - first) / max(tokens - 1, 1)


def measure(url: str, lengths: list[int], requests: int, max_tokens: int) -> dict[int, tuple[float, float]]:
    rng = random.Random(0)
    one_request(url, [rng.randrange(3, VOCAB) for _ in range(64)], 4)  # warm-up
    out = {}
    for n in lengths:
        samples = [one_request(url, [rng.randrange(3, VOCAB) for _ in range(n)], max_tokens) for _ in range(requests)]
        out[n] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
    return out


def exposed_share(url: str) -> tuple[float, float]:
    totals = {"transfer": 0.0, "exposed": 0.0}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("pdserve:kv_transfer_seconds{") and 'role="prefill"' in line:
            for kind in totals:
                if f'kind="{kind}"' in line:
                    totals[kind] += float(line.split()[-1])
    return totals["transfer"], totals["exposed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--requests", type=int, default=5, help="requests per length (median reported)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--log-dir", default="/tmp")
    args = parser.parse_args()
    common = ["--max-model-len", str(max(args.lengths) + args.max_tokens + 64),
              "--kv-cache-memory-bytes", str(512 << 20)]
    results = {}
    for name, extra in (("colocated", ["--mode", "colocated"]), ("disaggregated", [])):
        server = ServeProcess(common + extra + ["--log-level", "warning"],
                              Path(args.log_dir) / f"bench_disagg_{name}.log")
        try:
            server.wait_ready()
            results[name] = measure(server.url, args.lengths, args.requests, args.max_tokens)
            if name == "disaggregated":
                time.sleep(2)  # a stats refresh
                transfer, exposed = exposed_share(server.url)
        finally:
            server.terminate()
    print(f"\n{'prompt':>7} | {'TTFT colo ms':>12} {'TTFT disagg ms':>14} {'ratio':>6} | "
          f"{'TPOT colo ms':>12} {'TPOT disagg ms':>14} {'ratio':>6}")
    for n in args.lengths:
        (ct, cp), (dt, dp) = results["colocated"][n], results["disaggregated"][n]
        print(f"{n:>7} | {ct * 1e3:>12.1f} {dt * 1e3:>14.1f} {dt / ct:>6.2f} | "
              f"{cp * 1e3:>12.2f} {dp * 1e3:>14.2f} {dp / cp:>6.2f}")
    share = exposed / transfer if transfer else float("nan")
    print(f"\nKV transfer time {transfer:.3f} s in all, exposed (after the prompt's compute) {exposed:.3f} s: "
          f"{share:.1%} left exposed")


if __name__ == "__main__":
    main()
