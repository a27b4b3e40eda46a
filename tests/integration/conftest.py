"""A real `pdserve serve` (vLLM-CPU engines in Ray) shared by a test module.

Engine start-up costs ~40 s or more, so each module starts one server and
every test in it talks to that server.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pdserve.serve_process import ServeProcess

def _offline_greedy(model_dir: Path, prompts: list[list[int]], max_len: int, kv_bytes: int,
                   max_tokens: int) -> list[list[int]]:
    """Greedy token ids of one colocated engine (vLLM's offline `LLM`, in this process) per prompt."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # no engine-core subprocess to spawn and reap
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), max_model_len=max_len, kv_cache_memory_bytes=kv_bytes, enforce_eager=True,
              seed=0)
    try:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        mp.undo()


@pytest.fixture(scope="session")
def offline_greedy():
    """The reference engine for greedy-equality checks, as a callable."""
    return _offline_greedy


@pytest.fixture(scope="module")
def serve_factory(tmp_path_factory):
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        server = ServeProcess(list(args), tmp_path_factory.mktemp("serve") / "serve.log")
        started.append(server)
        return server

    yield start
    for server in started:
        try:
            server.terminate()
        except subprocess.TimeoutExpired:
            server.kill_all()
