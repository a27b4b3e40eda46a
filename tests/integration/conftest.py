"""A real `pdserve serve` (vLLM-CPU engines in Ray) shared by a test module.

Engine start-up costs ~40 s or more, so each module starts one server and
every test in it talks to that server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`pdserve serve` in a subprocess, with its log in a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", "serve", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"pdserve serve not ready after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def terminate(self, timeout_s: float = 90) -> int:
        """SIGTERM, as an operator or Kubernetes would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.log.close()

    def kill_all(self) -> None:
        for child in self.descendants():
            child.kill()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


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
