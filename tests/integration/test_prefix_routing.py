"""`pdserve serve --prefill 1 --decode 2 --routing-policy prefix_aware` on real vLLM-CPU engines (issue 15).

A conversation's second turn resends the first turn's prompt: the router's
prefix index (fed by the engines' KV events) sends it to the decode
instance holding that history, P reuses its own prefix cache and sends D
only the blocks D lacks. What must hold: greedy output token-identical to
one colocated engine's, `usage.prompt_tokens_details.cached_tokens` equal to
what that engine reports for the same sequence of requests, bytes saved
counted, the index following events with no hash disagreement.
"""

from __future__ import annotations

import random
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

MAX_LEN = 2048
GEN_TOKENS = 8
KV_BYTES = str(192 * 1024 * 1024)
VOCAB = 4096


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


HISTORY = _tokens(1, 700)
TURNS = [HISTORY, HISTORY + _tokens(2, 300), _tokens(3, 64)]


@pytest.fixture(scope="module")
def started(serve_factory):
    return serve_factory("--prefill", "1", "--decode", "2", "--routing-policy", "prefix_aware",
                         "--max-model-len", str(MAX_LEN), "--kv-cache-memory-bytes", KV_BYTES, "--dtype", "float32")


def _colocated(model_dir, turns: list[list[int]]) -> list[tuple[list[int], int]]:
    """One colocated engine (offline vLLM, in-process, prefix caching on), the turns one call after the other:
    (greedy token ids, num_cached_tokens) per turn."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), max_model_len=MAX_LEN, kv_cache_memory_bytes=int(KV_BYTES), enforce_eager=True,
              seed=0, dtype="float32", enable_prefix_caching=True)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True)
        outs = [llm.generate([TokensPrompt(prompt_token_ids=t)], greedy)[0] for t in turns]
        return [(list(o.outputs[0].token_ids), o.num_cached_tokens or 0) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        mp.undo()


@pytest.fixture(scope="module")
def reference(started, demo_model_dir):
    return _colocated(demo_model_dir, TURNS)


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def _ask(url: str, prompt: list[int]) -> dict:
    body = {"prompt": prompt, "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_turns_equal_colocated_and_reuse_the_history(started, reference):
    started.wait_ready()
    url = started.url
    answers = []
    for turn in TURNS:
        answers.append(_ask(url, turn))
        time.sleep(1.0)  # the engines' KV events reach the router (a conversation's think time)
    for i, (got, (tokens, _)) in enumerate(zip(answers, reference)):
        assert got["choices"][0]["token_ids"] == tokens, f"turn {i}"
    cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    # P computed turn 1 and holds its full blocks; a colocated engine that ran turn 1 reports the same hit.
    assert cached == [hit for _, hit in reference]
    assert cached[1] > 0
    time.sleep(2.0)  # a stats refresh
    text = httpx.get(url + "/metrics", timeout=10).text
    assert _metric(text, "pdserve:prefix_cache_hits_total", role="prefill") == sum(cached)
    assert _metric(text, "pdserve:kv_transfer_bytes_saved_total", role="prefill") > 0  # D held the history
    assert _metric(text, "pdserve:prefix_index", counter="events") > 0
    assert _metric(text, "pdserve:prefix_index", counter="subscriber_hash_checked") > 0
    assert _metric(text, "pdserve:prefix_index", counter="subscriber_hash_mismatch") == 0
