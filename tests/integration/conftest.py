"""A real `pdserve serve` (vLLM-CPU engines in Ray) shared by a test module.

Engine start-up costs ~40 s or more, so each module starts one server and
every test in it talks to that server.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pdserve.serve_process import ServeProcess

def _offline_generate(model_dir: Path, requests: list[tuple[list[int], dict]], max_len: int, kv_bytes: int,
                      **engine_kwargs) -> list:
    """One colocated engine's answers (vLLM's offline `LLM`, in this process): a RequestOutput per
    (prompt token ids, SamplingParams keyword arguments)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # no engine-core subprocess to spawn and reap
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), max_model_len=max_len, kv_cache_memory_bytes=kv_bytes, enforce_eager=True,
              seed=0, **engine_kwargs)
    try:
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests],
                            [SamplingParams(**kwargs) for _, kwargs in requests])
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        mp.undo()


def _offline_greedy(model_dir: Path, prompts: list[list[int]], max_len: int, kv_bytes: int,
                   max_tokens: int, **engine_kwargs) -> list[list[int]]:
    """Greedy token ids of one colocated engine per prompt."""
    greedy = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    outputs = _offline_generate(model_dir, [(p, greedy) for p in prompts], max_len, kv_bytes, **engine_kwargs)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="session")
def offline_generate():
    """The reference engine for equality checks with any sampling parameters, as a callable."""
    return _offline_generate


@pytest.fixture(scope="session")
def offline_greedy():
    """The reference engine for greedy-equality checks, as a callable."""
    return _offline_greedy


@pytest.fixture(scope="module")
def serve_factory(tmp_path_factory):
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        server = ServeProcess(list(args), tmp_path_factory.mktemp("serve") / "serve.log", env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        try:
            server.terminate()
        except subprocess.TimeoutExpired:
            server.kill_all()
