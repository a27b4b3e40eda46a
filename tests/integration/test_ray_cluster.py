"""P and D on two Ray nodes, each with its own temporary directory; scaling while serving.

A two-node Ray cluster on this machine: the head (resource `pool_p`) and a
second node at 127.0.0.2 (resource `pool_d`, its own --temp-dir). The
pools' Ray resources put prefill on the head and decode on the second node,
so D's reservation can only reach the router over the network (no shared
board directory exists any more) and the KV must cross between the two
nodes' addresses. Then: the decode instance is removed while idle (requests
run whole on P meanwhile, none fails) and one is added back while requests
are being served, and it gets traffic.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pdserve.serve_process import metric_value as _metric
import yaml

pytestmark = pytest.mark.integration

MAX_LEN = 2048
GEN_TOKENS = 10
KV_BYTES = 128 * 1024 * 1024
LENGTHS = [3, 40, 300, 777, 1500]
VOCAB = 4096
SECOND_NODE_IP = "127.0.0.2"


def _prompt(length: int) -> list[int]:
    rng = random.Random(length)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def _ray(*args: str, env: dict[str, str]) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, *args], check=True, env=env, timeout=180, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` plus a second node on its own loopback address and temp dir."""
    from pdserve.serve_process import free_port

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    head_tmp, node_tmp = tmp_path_factory.mktemp("ray-head"), tmp_path_factory.mktemp("ray-node")
    _ray("start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
         "--resources", '{"pool_p": 1}', "--temp-dir", str(head_tmp), "--include-dashboard", "false",
         "--disable-usage-stats", env=env)
    try:
        _ray("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", SECOND_NODE_IP, "--num-cpus", "1",
             "--resources", '{"pool_d": 1}', "--temp-dir", str(node_tmp), "--disable-usage-stats", env=env)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], env=env, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def started(cluster, serve_factory, tmp_path_factory):
    config = {
        "engine": {"dtype": "float32", "max_model_len": MAX_LEN, "kv_cache_memory_bytes": KV_BYTES},
        "pools": {"prefill": {"instances": 1, "resources": {"pool_p": 1}},
                  "decode": {"instances": 1, "resources": {"pool_d": 1}}},
        "ray": {"address": cluster},
    }
    path = tmp_path_factory.mktemp("config") / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    return serve_factory("--config", str(path))


@pytest.fixture(scope="module")
def reference(started, demo_model_dir, offline_greedy):
    outputs = offline_greedy(demo_model_dir, [_prompt(n) for n in LENGTHS], MAX_LEN, KV_BYTES, GEN_TOKENS,
                             dtype="float32")
    return dict(zip(LENGTHS, outputs))


@pytest.fixture(scope="module")
def server(started, reference):
    started.wait_ready()
    return started


def _instances(server) -> dict[str, dict]:
    listed = httpx.get(server.url + "/admin/instances", timeout=10).json()
    return {i["instance_id"]: i for i in listed["instances"]}


def _ask(server, n: int) -> dict:
    body = {"prompt": _prompt(n), "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_prefill_and_decode_on_two_nodes_hand_off_token_identical(server, reference):
    instances = _instances(server)
    prefill, decode = instances["prefill-0"], instances["decode-0"]
    # Placed by pool resources: decode on the second node, prefill elsewhere; each transport advertises
    # its own node's address (from Ray), so the KV crosses between the two.
    assert decode["node_ip"] == decode["kv_host"] == SECOND_NODE_IP
    assert prefill["node_ip"] != SECOND_NODE_IP and prefill["kv_host"] == prefill["node_ip"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = dict(zip(LENGTHS, pool.map(lambda n: _ask(server, n), LENGTHS)))
    for n in LENGTHS:
        assert answers[n]["choices"][0]["token_ids"] == reference[n], f"prompt of {n} tokens"
    time.sleep(2)
    text = httpx.get(server.url + "/metrics").text
    assert _metric(text, "pdserve:handoffs", outcome="handoffs") == len(LENGTHS)
    assert _metric(text, "pdserve:handoffs", outcome="fallbacks_colocated") == 0
    assert _metric(text, "pdserve:kv_transfers", instance="decode-0", event="recv_done") == len(LENGTHS)
    assert _metric(text, "pdserve:kv_transfers", instance="decode-0", event="recv_failed") == 0  # nothing recomputed
    assert _metric(text, "pdserve:kv_transfer_bytes", instance="prefill-0") > 0


def test_removing_decode_while_idle_and_adding_one_back_while_serving_fails_nothing(server, reference):
    # Remove the only decode instance while idle: it drains at once and leaves; P serves requests whole.
    assert httpx.post(server.url + "/admin/scale", json={"decode": 0}, timeout=10).status_code == 202
    _wait(lambda: "decode-0" not in _instances(server), 120, "decode-0 removed")
    assert _ask(server, 777)["choices"][0]["token_ids"] == reference[777]
    # Add one back while requests are being served.
    results: list[dict] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(_ask(server, 300))
            except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
                errors.append(exc)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(load) for _ in range(2)]
        try:
            assert httpx.post(server.url + "/admin/scale", json={"decode": 1}, timeout=10).status_code == 202
            _wait(lambda: _instances(server).get("decode-1", {}).get("state") == "ready", 300, "decode-1 ready")
            joined, served = time.monotonic(), len(results)
            _wait(lambda: _metric(httpx.get(server.url + "/metrics").text, "pdserve:kv_transfers",
                                  instance="decode-1", event="recv_done") > 0, 30, "traffic on decode-1")
            first_traffic_s = time.monotonic() - joined
            _wait(lambda: len(results) > served + 4, 60, "requests after decode-1 joined")
        finally:
            stop.set()
            for future in running:
                future.result(timeout=120)
    assert not errors, errors[:3]
    assert all(r["choices"][0]["token_ids"] == reference[300] for r in results)
    assert first_traffic_s < 10, first_traffic_s  # the newcomer gets traffic within a few seconds
    assert _instances(server)["decode-1"]["node_ip"] == SECOND_NODE_IP  # placed by its pool's resources
