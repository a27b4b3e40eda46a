"""Shared links: concurrent KV transfers split a machine's bandwidth (hand-computed timelines)."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.planner.links import SharedLinks
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.simulator import InstanceSpec, LinkConfig, SimConfig, Simulator
from pdserve.planner.trace import Trace
from pdserve.router.registry import make_policy
from pdserve.shared.roles import Role


def test_two_transfers_out_of_one_machine_each_get_half_the_bandwidth():
    links = SharedLinks(bandwidth=100.0)  # bytes/s
    links.add(0.0, 1, src=0, dst=1, nbytes=100.0)
    links.add(0.0, 2, src=0, dst=2, nbytes=100.0)
    assert [f.rate for f in links.flows.values()] == [50.0, 50.0]
    assert links.next_finish() == pytest.approx(2.0)  # alone: 1.0
    assert links.pop_finished(1.9) == []
    assert sorted(links.pop_finished(2.0)) == [1, 2]


def test_a_late_joiner_into_one_decode_machine_slows_the_first_then_speeds_up():
    # A alone 0-0.5 (50 B at 100 B/s); A and B share D's link 0.5-1.5 (50 B each at 50 B/s):
    # A done at 1.5; B alone again, its last 50 B at 100 B/s: done at 2.0
    links = SharedLinks(bandwidth=100.0)
    links.add(0.0, 1, src=0, dst=9, nbytes=100.0)
    links.add(0.5, 2, src=1, dst=9, nbytes=100.0)
    assert links.next_finish() == pytest.approx(1.5)
    assert links.pop_finished(1.5) == [1]
    assert links.flows[2].rate == 100.0
    assert links.next_finish() == pytest.approx(2.0)


def test_max_min_fairness_gives_unused_share_to_the_others():
    # P0 sends to D0 and D1; P1 also sends to D1. D1's link is split by two, P0's by two:
    # all three get 50; nobody is left with spare bandwidth to take.
    links = SharedLinks(bandwidth=100.0)
    links.add(0.0, 1, 0, 10, 1e3)
    links.add(0.0, 2, 0, 11, 1e3)
    links.add(0.0, 3, 1, 11, 1e3)
    assert {k: f.rate for k, f in links.flows.items()} == {1: 50.0, 2: 50.0, 3: 50.0}
    # three out of P0, one of them also sharing D1 with P1's: P0's three get 100/3, P1's gets the rest of D1
    links = SharedLinks(bandwidth=100.0)
    for k, (s, d) in enumerate([(0, 10), (0, 11), (0, 12), (1, 12)]):
        links.add(0.0, k, s, d, 1e3)
    assert links.flows[3].rate == pytest.approx(100 - 100 / 3)


def _simulate(shared: bool):
    # Two prefill machines, one decode machine; two 10-token prompts arrive together and are
    # prefilled 0-1 s, one on each; 10 tokens x 1000 B = 10 kB of KV each into the decode machine,
    # whose link carries 10 kB/s, no overlap: alone 1 s each, together 2 s each. Then 2 steps of 0.1 s.
    inst = [InstanceSpec(f"p{i}", Role.PREFILL, "x", PerfModel.constant(1.0, 0.1), 100_000) for i in range(2)]
    inst += [InstanceSpec("d0", Role.DECODE, "x", PerfModel.constant(1.0, 0.1), 100_000)]
    link = LinkConfig(bandwidth_gbps=1e-5, latency_s=0.25, overlap=0.0, shared=shared)
    cfg = SimConfig(kv_bytes_per_token=1000, link=link)
    trace = Trace("t", np.array([0.0, 0.0]), np.array([10, 10]), np.array([3, 3]))
    return Simulator(inst, make_policy("round_robin"), cfg).run(trace)


def test_simulator_timeline_with_two_concurrent_handoffs():
    res = _simulate(shared=True)
    np.testing.assert_allclose(res.first_token, [1.0, 1.0])
    np.testing.assert_allclose(res.handoff, [2.25, 2.25])  # 2 s at half bandwidth + 0.25 s latency
    np.testing.assert_allclose(res.finish, [3.45, 3.45])
    alone = _simulate(shared=False)
    np.testing.assert_allclose(alone.handoff, [1.25, 1.25])
    np.testing.assert_allclose(alone.finish, [2.45, 2.45])


def test_layer_wise_overlap_hides_bytes_behind_the_prefill_as_before():
    # alone on its links, the shared model gives the closed form latency + max(T(1-o), T - prefill)
    inst = [InstanceSpec("p0", Role.PREFILL, "x", PerfModel.constant(1.0, 0.1), 100_000),
            InstanceSpec("d0", Role.DECODE, "x", PerfModel.constant(1.0, 0.1), 100_000)]
    for overlap, expected in ((0.2, 1.6 + 0.25), (0.9, 1.0 + 0.25)):  # T = 2 s, prefill 1 s
        link = LinkConfig(bandwidth_gbps=1e-5, latency_s=0.25, overlap=overlap)
        res = Simulator(inst, make_policy("round_robin"), SimConfig(kv_bytes_per_token=2000, link=link)).run(
            Trace("t", np.array([0.0]), np.array([10]), np.array([3])))
        assert res.handoff[0] == pytest.approx(expected)
        assert link.handoff_time(20_000, 1.0) == pytest.approx(expected)
