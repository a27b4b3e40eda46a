"""`pdserve serve --prefill 1 --decode 1`: P->D through the gateway on real vLLM-CPU engines.

The prompt's KV moves from the prefill instance into blocks the decode
instance reserved (pdserve's KV connector over TCP); greedy output must equal
one colocated engine's (vLLM's offline `LLM`), token for token.
"""

from __future__ import annotations

import concurrent.futures
import random
import time

import httpx
import pytest

from pdserve.serve_process import metric_value as _metric

pytestmark = pytest.mark.integration

MAX_LEN = 2048
GEN_TOKENS = 12
KV_BYTES = str(192 * 1024 * 1024)
LENGTHS = [1, 2, 5, 17, 50, 100, 200, 300, 400, 500, 640, 777, 900, 1000, 1100, 1250, 1400, 1500, 1700, 1900]
VOCAB = 4096


def _prompt(length: int) -> list[int]:
    rng = random.Random(length)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


@pytest.fixture(scope="module")
def started(serve_factory):
    # float32 on both sides: in bf16, the batch shapes of a loaded server and of the offline reference
    # move logits in the third digit and greedy decoding can part at a near-tie.
    return serve_factory("--prefill", "1", "--decode", "1", "--max-model-len", str(MAX_LEN),
                         "--kv-cache-memory-bytes", KV_BYTES, "--dtype", "float32")


@pytest.fixture(scope="module")
def reference(started, demo_model_dir, offline_greedy):
    """Greedy token ids of one colocated engine (offline vLLM, in-process) for every prompt."""
    outputs = offline_greedy(demo_model_dir, [_prompt(n) for n in LENGTHS], MAX_LEN, int(KV_BYTES), GEN_TOKENS,
                             dtype="float32")
    return dict(zip(LENGTHS, outputs))


@pytest.fixture(scope="module")
def server(started, reference):
    started.wait_ready()
    return started


def _instances(server) -> dict[str, dict]:
    return {i["instance_id"]: i for i in httpx.get(server.url + "/health", timeout=10).json()["instances"]}


def test_handoff_output_equals_colocated(server, reference):
    def ask(n: int) -> dict:
        body = {"prompt": _prompt(n), "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        resp = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
        assert resp.status_code == 200, resp.text
        return resp.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(zip(LENGTHS, pool.map(ask, LENGTHS)))
    for n in LENGTHS:
        assert answers[n]["choices"][0]["token_ids"] == reference[n], f"prompt of {n} tokens"
        assert answers[n]["usage"]["completion_tokens"] == GEN_TOKENS
    time.sleep(2)  # two stats refreshes
    text = httpx.get(server.url + "/metrics").text
    # A 1-token prompt has no KV to move: D runs it alone (P is not asked).
    assert _metric(text, "pdserve:handoffs", outcome="handoffs") == len(LENGTHS) - 1
    assert _metric(text, "pdserve:handoffs", outcome="decode_alone") == 1
    assert _metric(text, "pdserve:handoffs", outcome="fallbacks_colocated") == 0
    assert _metric(text, "pdserve:handoffs", outcome="first_token_restarts") == 0
    # D received every prompt's KV (a 1-token prompt has none to move) and recomputed none.
    assert _metric(text, "pdserve:kv_transfers", instance="decode-0", event="recv_done") == len(LENGTHS) - 1
    assert _metric(text, "pdserve:kv_transfers", instance="decode-0", event="recv_failed") == 0
    assert _metric(text, "pdserve:kv_transfer_bytes", instance="prefill-0") > 0
    # Every request's handoff (P's token -> D's first step) is in the lifecycle histogram.
    assert _metric(text, "pdserve:kv_handoff_seconds_count") == len(LENGTHS) - 1


def test_streaming_first_token_from_prefill(server, reference):
    n = 640
    body = {"prompt": _prompt(n), "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert len(events) >= GEN_TOKENS  # a chunk per token: P's first, then D's


def test_prefill_and_decode_engine_cores_disjoint_and_not_niced(server):
    """P's and D's model workers (where their engine cores compute) never share a core; neither is niced."""
    import os

    workers = [p for p in server.descendants() if p.name().startswith("VLLM::Worker") and p.status() != "zombie"]
    assert len(workers) == 2, [p.name() for p in server.descendants()]
    first, second = (set(p.cpu_affinity()) for p in workers)
    if len(os.sched_getaffinity(0)) >= 2:
        assert not first & second, (first, second)
    assert [p.nice() for p in workers] == [0, 0]


def test_disconnects_free_blocks_on_both_sides(server):
    for n in (300, 1000, 1500):
        body = {"prompt": _prompt(n), "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as resp:
            lines = resp.iter_lines()
            [next(lines) for _ in range(4)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = _instances(server)
        if all(s["in_flight"] == 0 and s["num_running"] == 0 and s["kv_usage"] == 0.0 for s in stats.values()):
            break
        time.sleep(0.5)
    assert all(s["in_flight"] == 0 and s["num_running"] == 0 for s in stats.values()), stats
    assert all(s["kv_usage"] == 0.0 for s in stats.values()), stats


def test_200_requests_aborted_at_random_moments_leak_no_blocks(server, reference):
    """Queued, prefilling, transferring, decoding: wherever the abort lands, both sides free everything."""
    import asyncio

    rng = random.Random(2024)
    plan = [(rng.choice(LENGTHS), rng.random() < 0.5, rng.uniform(0.0, 2.5)) for _ in range(200)]

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, n: int, stream: bool, abort_after: float):
        body = {"prompt": _prompt(n), "max_tokens": 200, "ignore_eos": True, "stream": stream}
        async with gate:
            async def call():
                if stream:
                    async with client.stream("POST", server.url + "/v1/completions", json=body) as resp:
                        async for _ in resp.aiter_lines():
                            pass
                else:
                    await client.post(server.url + "/v1/completions", json=body)
            try:
                await asyncio.wait_for(call(), timeout=abort_after)  # the client goes away
            except asyncio.TimeoutError:
                pass

    async def run_all():
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(*(one(client, gate, *item) for item in plan))

    asyncio.run(run_all())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stats = _instances(server)
        if all(s["in_flight"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_usage"] == 0.0
               for s in stats.values()):
            break
        time.sleep(1)
    brief = {k: {f: s[f] for f in ("in_flight", "num_running", "num_waiting", "kv_usage", "orphans_aborted")}
             for k, s in stats.items()}
    assert all(s["in_flight"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats.values()), brief
    assert all(s["kv_usage"] == 0.0 for s in stats.values()), brief  # every block free again, on P and on D
    # And the pair still hands off correctly afterwards.
    body = {"prompt": _prompt(777), "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    answer = httpx.post(server.url + "/v1/completions", json=body, timeout=300).json()
    assert answer["choices"][0]["token_ids"] == reference[777]
