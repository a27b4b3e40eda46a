"""`pdserve serve` as a child process, for tests, benchmarks and tools.

Lifecycle: started on a free port (its log in a file) -> wait_ready() polls
/health -> requests -> terminate() sends SIGTERM as an operator would and
waits; kill_all() is the last resort for a server that will not stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

START_TIMEOUT_S = 600


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the first sample of `name` in a Prometheus text scrape carrying `labels` (0 if none)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`pdserve serve` in a subprocess, with its log in a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 command: Callable[[int], list[str]] | None = None) -> None:
        """`command(port)`, when given, is another server's whole command line (benchmarks: `vllm serve`)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = open(log_path, "w")
        argv = command(self.port) if command else [sys.executable, "-m", "pdserve", "serve",
                                                   "--port", str(self.port), *args]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def descendants(self) -> list:
        """Every process under the server (Ray, engine actors, vLLM engine cores)."""
        import psutil

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
