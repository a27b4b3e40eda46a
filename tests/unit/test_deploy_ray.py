"""deploy/: the plain-Ray-cluster steps (printed with DRY_RUN=1, nothing started), their config, and
deploy/drain_node.py (a node's instances drained before the node goes: the chart's preStop)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
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


# --- deploy/drain_node.py: a node's instances drained before it goes (the chart's preStop) ---

def _drain_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("drain_node", REPO / "deploy" / "drain_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


drain = _drain_module()
NODE, OTHER = "10.0.0.2", "10.0.0.3"


class _FakeGateway:
    """A gateway with a targeted drain: drained instances leave after `leave_after` polls."""

    def __init__(self, instances: list[dict], leave_after: int = 2, key: str | None = None) -> None:
        import http.server
        import threading

        self.instances, self.leave_after, self.key = instances, leave_after, key
        self.drained: list[str] = []
        self.polls_since_drain = 0
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if gateway.key and self.headers.get("Authorization") != f"Bearer {gateway.key}":
                    self._reply(401, {"error": {"message": "bad key"}})
                    return False
                return True

            def do_GET(self):
                if not self._authorized():
                    return
                if gateway.drained:
                    gateway.polls_since_drain += 1
                    if gateway.polls_since_drain > gateway.leave_after:
                        gateway.instances = [i for i in gateway.instances if i["instance_id"] not in gateway.drained]
                self._reply(200, {"instances": gateway.instances, "starting": {}})

            def do_POST(self):
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gateway.drained = body["instances"]
                for item in gateway.instances:
                    if item["instance_id"] in gateway.drained:
                        item["state"] = "draining"
                self._reply(202, {})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _item(iid: str, node_ip: str, running: int = 0) -> dict:
    return {"instance_id": iid, "role": "decode", "state": "ready", "node_ip": node_ip,
            "num_running": running, "num_waiting": 0, "in_flight": running}


def test_node_instances_and_what_remains():
    view = {"instances": [_item("decode-1", NODE, 2), _item("decode-0", NODE), _item("decode-2", OTHER, 1)]}
    assert drain.node_instances(view, NODE) == ["decode-0", "decode-1"]
    assert drain.remaining(view, ["decode-0", "decode-1"], drain.Mode.TARGETED) == ["decode-0", "decode-1"]
    assert drain.remaining(view, ["decode-0", "decode-1"], drain.Mode.WAIT_IDLE) == ["decode-1"]


def test_targeted_drain_waits_until_the_node_s_instances_leave():
    gw = _FakeGateway([_item("decode-0", NODE, 3), _item("decode-1", OTHER, 1)], leave_after=3, key="k")
    try:
        logs: list[str] = []
        ok = drain.drain_node(drain.Gateway(gw.url, "k", 5), NODE, deadline_s=10, poll_s=0.05, log=logs.append)
        assert ok and gw.drained == ["decode-0"]  # only this node's instance, never the other one
        assert [i["instance_id"] for i in gw.instances] == ["decode-1"]
        assert gw.polls_since_drain > 3  # it returned only after the instance had left
        assert any("targeted" in line for line in logs)
    finally:
        gw.close()


def test_drain_gives_up_at_the_deadline_and_on_a_bad_key():
    gw = _FakeGateway([_item("decode-0", NODE, 3)], leave_after=10**6, key="k")
    try:
        started = time.monotonic()
        assert not drain.drain_node(drain.Gateway(gw.url, "k", 5), NODE, deadline_s=0.5, poll_s=0.05,
                                    log=lambda m: None)
        assert time.monotonic() - started < 3
        logs: list[str] = []
        assert not drain.drain_node(drain.Gateway(gw.url, "wrong", 5), NODE, deadline_s=0.3, poll_s=0.05,
                                    log=logs.append)
        assert any("401" in line for line in logs) and gw.drained == ["decode-0"]
    finally:
        gw.close()


def test_nothing_on_the_node_and_no_gateway():
    gw = _FakeGateway([_item("decode-0", OTHER, 1)])
    try:
        assert drain.drain_node(drain.Gateway(gw.url, None, 5), NODE, deadline_s=5, poll_s=0.05, log=lambda m: None)
        assert gw.drained == []
    finally:
        gw.close()
    assert not drain.drain_node(drain.Gateway(gw.url, None, 0.2), NODE, deadline_s=0.5, poll_s=0.1,
                                log=lambda m: None)
    # A gateway that is gone (uninstall: every pod stops at once) ends the wait long before the deadline.
    started, logs = time.monotonic(), []
    assert not drain.drain_node(drain.Gateway(gw.url, None, 0.2), NODE, deadline_s=60, poll_s=0.05,
                                unreachable_s=0.5, log=logs.append)
    assert time.monotonic() - started < 5 and "giving up" in logs[-1]


def test_cli_needs_a_node_ip():
    result = subprocess.run([sys.executable, str(REPO / "deploy" / "drain_node.py"), "--gateway", "http://x"],
                            capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 2 and "--node-ip" in result.stderr


def test_against_the_real_gateway_it_drains_the_node_s_instance_after_its_stream_ends(demo_model_dir):
    """pdserve's own /admin/instances and POST /admin/drain: the node's instance takes no new request,
    finishes its stream, and leaves; the other node's instance serves on."""
    import asyncio
    import threading

    import httpx

    from pdserve.gateway.app import GatewayState, create_app
    from pdserve.gateway.model import ServedModel
    from pdserve.gateway.server import GatewayServer
    from pdserve.router.controller import Router
    from pdserve.router.registry import make_policy
    from pdserve.router.scaling import Scaler
    from pdserve.shared.metrics import Metrics
    from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan

    class Factory:
        stopped: list[str] = []

        async def start(self, role):
            raise AssertionError("a drain without replace starts nothing")

        async def stop(self, client) -> None:
            await asyncio.sleep(0)
            self.stopped.append(client.instance_id)

    model = ServedModel.load("demo", str(demo_model_dir), 256)
    engines = [FakeEngineClient.make(instance_id=iid, max_model_len=256, detokenize=model.decode,
                                     faults=FaultPlan(token_interval_s=0.05)) for iid in ("mixed-0", "mixed-1")]
    engines[0].info.node_ip, engines[1].info.node_ip = NODE, OTHER
    router = Router(engines, make_policy("round_robin"))
    factory = Factory()
    state = GatewayState(model, router, Metrics("demo"), stats_interval_s=0.05,
                         scaler=Scaler(router, factory, disaggregated=False, drain_timeout_s=20))
    server = GatewayServer(create_app(state), "127.0.0.1", 0, log_level="warning")
    url = server.start_in_thread()
    body = {"model": "demo", "prompt": "Open a file", "max_tokens": 30, "ignore_eos": True, "stream": True}
    try:
        done: dict[str, float] = {}

        def stream() -> None:
            reply = httpx.post(f"{url}/v1/completions", timeout=30, json=body)
            assert reply.status_code == 200 and "[DONE]" in reply.text
            done["at"] = time.monotonic()

        client = threading.Thread(target=stream)
        client.start()  # round robin: the first request lands on mixed-0, on NODE
        deadline = time.monotonic() + 10
        while not engines[0].in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engines[0].in_flight, "the request never reached the engine"
        logs: list[str] = []
        ok = drain.drain_node(drain.Gateway(url, None, 5), NODE, deadline_s=20, poll_s=0.05, log=logs.append)
        freed = time.monotonic()
        client.join(30)
        assert ok and "at" in done and freed >= done["at"]  # the stream ended before the node was let go
        assert any("targeted" in line for line in logs), logs
        assert factory.stopped == ["mixed-0"] and set(router.clients) == {"mixed-1"}
        assert httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=30).status_code == 200
    finally:
        server.stop()


def test_cluster_sh_drain_runs_the_script_for_this_node():
    argv = _argv(_dry("drain", "http://10.0.0.1:8000", NODE_IP=NODE, DRAIN_DEADLINE="30"))
    assert argv[1] == str(REPO / "deploy" / "drain_node.py")
    assert (_flag(argv, "--gateway"), _flag(argv, "--node-ip"), _flag(argv, "--deadline")) == \
        ("http://10.0.0.1:8000", NODE, "30")
    # Run for real against a gateway: the node's instance is drained, the other node's is not.
    gw = _FakeGateway([_item("decode-0", NODE, 1), _item("decode-1", OTHER, 1)], leave_after=1, key="k")
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        result = subprocess.run(["bash", str(SCRIPT), "drain", gw.url], capture_output=True, text=True, timeout=60,
                                env={**base, "NODE_IP": NODE, "PDSERVE_API_KEY": "k", "PYTHON": sys.executable})
        assert result.returncode == 0, result.stdout + result.stderr
        assert gw.drained == ["decode-0"] and f"{NODE} is free" in result.stdout
    finally:
        gw.close()
