"""The simulator's per-instance prefix cache: prefix-aware placement against least_loaded on conversations."""

from __future__ import annotations

import numpy as np

from pdserve.planner.perf_model import PerfModel
from pdserve.planner.prefix_cache import PrefixCacheModel, Sessions, multi_turn
from pdserve.planner.simulator import InstanceSpec, LinkConfig, SimConfig, Simulator
from pdserve.planner.trace import Trace
from pdserve.router.registry import make_policy
from pdserve.shared.roles import Role

LINK = LinkConfig(bandwidth_gbps=1.0, latency_s=0.0, overlap=0.0)


def _cluster(prefill=2, decode=2):
    perf = PerfModel.constant(prefill_s=0.2, step_s=0.01)
    return [InstanceSpec(f"p{i}", Role.PREFILL, "x", perf, 200_000) for i in range(prefill)] + \
           [InstanceSpec(f"d{i}", Role.DECODE, "x", perf, 200_000) for i in range(decode)]


def _run(policy, prompt, sessions, arrival):
    trace = Trace("conv", arrival, prompt, np.full(len(prompt), 8))
    return Simulator(_cluster(), make_policy(policy), SimConfig(link=LINK, kv_bytes_per_token=1000)).run(
        trace, sessions)


def test_prefix_cache_model_holds_leading_tokens_lru():
    cache = PrefixCacheModel([1000])
    cache.store(0, session=1, tokens=600)
    assert cache.held(0, 1, shared=400) == 400 and cache.held(0, 2, shared=400) == 0
    cache.store(0, session=2, tokens=600)  # 1200 > 1000: session 1, least recent, goes
    assert cache.held(0, 1, shared=400) == 0 and cache.held(0, 2, shared=600) == 600
    assert cache.held(0, -1, shared=600) == 0


def test_prefix_aware_computes_and_moves_less_on_conversations():
    prompt, sessions = multi_turn(conversations=6, turns=4, turn_tokens=256)
    # Conversations come back in a different order every turn (their think times differ).
    rng = np.random.default_rng(0)
    order = np.concatenate([t * 6 + rng.permutation(6) for t in range(4)])
    prompt, sessions = prompt[order], Sessions(sessions.session[order], sessions.shared[order])
    arrival = np.repeat(np.arange(4) * 5.0, 6) + np.tile(np.arange(6) * 0.05, 4)  # turns 5 s apart
    base = _run("least_loaded", prompt, sessions, arrival)
    aware = _run("prefix_aware", prompt, sessions, arrival)
    assert base.finished.all() and aware.finished.all()
    history = sessions.shared.sum()
    # prefix_aware finds (nearly) every turn's history on the instances that served the last turn; a
    # queue on the one holding it may send a turn elsewhere (load against hit)
    assert aware.prefill_computed.sum() <= 1.1 * (prompt.sum() - history + len(prompt))
    assert aware.kv_sent_tokens.sum() <= 1.1 * (prompt.sum() - history)
    assert aware.kv_sent_tokens.sum() < 0.75 * base.kv_sent_tokens.sum()
    assert aware.prefill_computed.sum() < base.prefill_computed.sum()
    # without sessions nothing is cached
    plain = Simulator(_cluster(), make_policy("prefix_aware"), SimConfig(link=LINK)).run(
        Trace("conv", arrival, prompt, np.full(len(prompt), 8)))
    assert plain.prefill_computed.sum() == prompt.sum()


def test_as_conversations_resends_each_conversations_history():
    from pdserve.planner.prefix_cache import as_conversations

    tr = Trace("t", np.arange(6, dtype=float), np.array([10, 20, 30, 40, 50, 60]), np.full(6, 2))
    conv, sessions = as_conversations(tr, turns=3)  # 2 conversations: requests 0,2,4 and 1,3,5
    assert sessions.session.tolist() == [0, 1, 0, 1, 0, 1]
    assert conv.prompt.tolist() == [10, 20, 40, 60, 90, 120]
    assert sessions.shared.tolist() == [0, 0, 10, 20, 40, 60]
    assert conv.arrival.tolist() == tr.arrival.tolist() and conv.output.tolist() == tr.output.tolist()


def test_simulate_cli_runs_conversations_with_prefix_caches(tmp_path):
    import json

    from pdserve.cli.main import main
    from test_simulate import _toy_profile

    machine = "cpu:profile_hardware=cpu,tensor_parallel=1,cost_per_hour=1,power_kw=0.2,memory_gb=10"
    figures = {}
    for policy in ("least_loaded", "prefix_aware"):
        out = tmp_path / policy
        argv = ["simulate", "--pools", "cpu/cpu:2+2", "--input-len", "200", "--output-len", "20", "--rate", "4",
                "--duration", "20", "--profile", str(_toy_profile(tmp_path)), "--model", "toy", "--weight-gb", "1",
                "--kv-bytes-per-token", "1000", "--machine", machine, "--slo-reference", "cpu", "--output-dir",
                str(out), "--no-charts", "--arrival", "poisson", "--turns", "4", "--policy", policy]
        assert main(argv) == 0
        figures[policy] = json.loads(next(out.glob("*.json")).read_text())
    base, aware = figures["least_loaded"], figures["prefix_aware"]
    assert base["turns"] == 4 and base["prompt_tokens"] == aware["prompt_tokens"]
    assert aware["kv_sent_tokens"] < base["kv_sent_tokens"]
    assert aware["prefill_tokens_computed"] < base["prefill_tokens_computed"]
