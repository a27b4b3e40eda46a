"""deploy/ray: the plain-Ray-cluster steps (printed with DRY_RUN=1, nothing started) and their config."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from pdserve.shared.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "ray" / "cluster.sh"


def _dry(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          env={**base, "DRY_RUN": "1", **env})


def _argv(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_head_runs_no_engines():
    argv = _argv(_dry("head", RAY_AUTH_TOKEN="t"))
    assert argv[:3] == ["ray", "start", "--head"]
    assert _flag(argv, "--num-cpus") == "0" and _flag(argv, "--num-gpus") == "0"


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_workers_advertise_their_role(role):
    argv = _argv(_dry("worker", role, "127.0.0.1:6379", RAY_AUTH_TOKEN="t", NUM_GPUS="8", INSTANCES="4",
                      NODE_IP="127.0.0.2", METRICS_PORT="8081"))
    assert _flag(argv, "--address") == "127.0.0.1:6379"
    assert json.loads(_flag(argv, "--resources")) == {f"pdserve_{role}": 4}
    assert _flag(argv, "--num-gpus") == "8" and _flag(argv, "--node-ip-address") == "127.0.0.2"
    assert _flag(argv, "--metrics-export-port") == "8081"


def test_serve_joins_the_cluster_with_the_shipped_config():
    argv = _argv(_dry("serve", "--port", "9000", RAY_AUTH_MODE="disabled"))
    assert argv[:2] == ["pdserve", "serve"] and argv[-2:] == ["--port", "9000"]
    assert _flag(argv, "--address") == "auto"
    config = ServeConfig.load(Path(_flag(argv, "--config")))
    assert config.ray.address == "auto" and config.pools.prefill and config.pools.decode


def test_refuses_to_start_without_ray_auth():
    result = _dry("head")
    assert result.returncode == 2 and "RAY_AUTH_TOKEN" in result.stderr
    assert _dry("worker", "mixed", "h:1", RAY_AUTH_TOKEN="t").returncode == 2
