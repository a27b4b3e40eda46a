"""The live engine's scheduler (vLLM V1 chunked prefill) and pdserve's serving overheads, by hand-computed timelines."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.planner.perf_model import Interp1D, PerfModel
from pdserve.planner.sim_config import LinkConfig, ServingOverheads, SimConfig
from pdserve.planner.simulator import InstanceSpec, Simulator
from pdserve.planner.trace import Trace
from pdserve.router.registry import make_policy
from pdserve.shared.roles import Role

# prefill: 10 ms per token of the step (prompt chunk + decodes riding along); decode step 0.1 s
LINEAR = PerfModel(Interp1D([100.0, 200.0], [1.0, 2.0]), Interp1D([1.0], [0.1]))
NO_TRANSFER = LinkConfig(bandwidth_gbps=1e12, latency_s=0.0, overlap=0.0)


def trace(arrival, prompt, output) -> Trace:
    return Trace("t", np.asarray(arrival, float), np.asarray(prompt), np.asarray(output))


def run(instances, tr, **cfg):
    cfg.setdefault("link", NO_TRANSFER)
    sim = Simulator(instances, make_policy("round_robin"), SimConfig(**cfg))
    return sim, sim.run(tr)


def mixed():
    return [InstanceSpec("m0", Role.MIXED, "x", LINEAR, 100_000)]


def test_a_decode_step_carrying_a_prefill_chunk_takes_the_prefill_time():
    # budget 100 tokens a step. r0 (50 tokens) prefills 0-0.5, then decodes (4 steps of 0.1).
    # r1 (150 tokens) arrives at 0.55, mid-step: the step in flight ends at 0.6. Then
    #   step 0.6-1.6: r0's decode (1 token) + r1's first chunk of 99 -> prefill_time(100) = 1.0
    #   step 1.6-2.12: r0's decode + r1's last 51 tokens -> prefill_time(52) = 0.52; r1's first token
    #   step 2.12-2.22: both decode; r0's 4th step and r1's only one: both finish.
    _, res = run(mixed(), trace([0.0, 0.55], [50, 150], [5, 2]), chunked_prefill=True, max_prefill_tokens=100)
    np.testing.assert_allclose(res.first_token, [0.5, 2.12])
    np.testing.assert_allclose(res.finish, [2.22, 2.22])


def test_without_chunking_a_long_prompt_stalls_the_batch_in_one_iteration():
    # the same trace, Splitwise's scheduler: r1's 150 tokens run whole 0.6-2.11 (r0 riding along),
    # then r0 has 2 steps left and r1 1: 2.21 and 2.31
    _, res = run(mixed(), trace([0.0, 0.55], [50, 150], [5, 2]), max_prefill_tokens=100)
    np.testing.assert_allclose(res.first_token, [0.5, 2.11])
    np.testing.assert_allclose(res.finish, [2.31, 2.21])


def test_chunks_of_two_prompts_share_a_step():
    # budget 100: r0 (60 tokens) starts alone at 0 (0.6 s); r1 and r2 (60 each) arrive at 0.1.
    # step 0.6-1.6: r0's decode + r1 whole (60) + r2's first 39 -> prefill_time(100); r1's first token
    # step 1.6-1.83: r0 and r1 decode + r2's last 21 -> prefill_time(23); r2's first token
    # r0 (3 tokens) made its 2 decode steps riding along, r1 (2 tokens) its one: all done at 1.83
    _, res = run(mixed(), trace([0.0, 0.1, 0.1], [60, 60, 60], [3, 2, 1]), chunked_prefill=True,
                 max_prefill_tokens=100)
    np.testing.assert_allclose(res.first_token, [0.6, 1.6, 1.83])
    np.testing.assert_allclose(res.finish, [1.83, 1.83, 1.83])


def test_the_router_sees_chunked_prompts_leave_the_queue_chunk_by_chunk():
    sim = Simulator(mixed(), make_policy("round_robin"), SimConfig(chunked_prefill=True, max_prefill_tokens=100,
                                                                     link=NO_TRANSFER))
    res = sim.run(trace([0.0], [250], [1]))
    # 3 steps: 100, 100, 50 tokens -> 1.0 + 1.0 + 0.5
    np.testing.assert_allclose(res.first_token, [2.5])
    i = sim.inst[0]
    assert i.pending_prefill_tokens == 0 and not i.prefill_queue and i.kv_free == i.kv_blocks_total


def split(perf=LINEAR):
    return [InstanceSpec("p0", Role.PREFILL, "x", perf, 100_000), InstanceSpec("d0", Role.DECODE, "x", perf, 100_000)]


LIVE = ServingOverheads(dispatch_s=0.05, reservation_at_step=True, decode_first_step=True)


def test_disaggregated_overheads_timeline():
    # r0 at 0: reaches D at 0.05 (idle), P prefills 50 tokens 0.05-0.55 (first token); KV lands at
    #   0.75 (latency 0.2); D runs 3 steps for 3 tokens (its first re-samples P's token): 1.05.
    # r1 at 0.78: reaches D at 0.83, mid-step (D's steps end at 0.85, 0.95, 1.05): its reservation goes
    #   out at 0.85, P prefills 0.85-1.35; KV at 1.55, D idle: 2 steps -> 1.75.
    _, res = run(split(), trace([0.0, 0.78], [50, 50], [3, 2]), chunked_prefill=True, overheads=LIVE,
                 link=LinkConfig(bandwidth_gbps=1e12, latency_s=0.2, overlap=0.0))
    np.testing.assert_allclose(res.first_token, [0.55, 1.35])
    np.testing.assert_allclose(res.finish, [1.05, 1.75])
    np.testing.assert_allclose(res.ttft, [0.55, 0.57])
    np.testing.assert_allclose(res.tpot, [0.25, 0.4])


def test_without_overheads_the_same_trace_has_none():
    _, res = run(split(), trace([0.0, 0.78], [50, 50], [3, 2]), chunked_prefill=True,
                 link=LinkConfig(bandwidth_gbps=1e12, latency_s=0.2, overlap=0.0))
    # r0: 0-0.5, KV 0.7, 2 steps -> 0.9; r1: 0.78-1.28, KV 1.48, 1 step -> 1.58
    np.testing.assert_allclose(res.first_token, [0.5, 1.28])
    np.testing.assert_allclose(res.finish, [0.9, 1.58])


def test_colocated_requests_pay_dispatch_but_no_reservation():
    _, res = run(mixed(), trace([0.0], [50], [3]), chunked_prefill=True, overheads=LIVE)
    np.testing.assert_allclose(res.first_token, [0.55])
    np.testing.assert_allclose(res.finish, [0.75])  # 2 decode steps: no extra step colocated


@pytest.mark.parametrize("chunked", [False, True])
def test_chunked_runs_conserve_everything(chunked):
    rng = np.random.default_rng(5)
    n = 300
    tr = trace(np.cumsum(rng.exponential(0.05, n)), rng.integers(1, 400, n), rng.integers(1, 40, n))
    perf = PerfModel(Interp1D([100.0, 200.0], [0.01, 0.02]), Interp1D([1.0], [0.005]))
    sim, res = run(split(perf) + [InstanceSpec("m0", Role.MIXED, "x", perf, 100_000)], tr, chunked_prefill=chunked,
                   max_prefill_tokens=128, overheads=LIVE)
    assert res.finished.all()
    assert (res.first_token > res.arrival).all() and (res.finish >= res.first_token).all()
    for i in sim.inst:
        assert i.kv_free == i.kv_blocks_total and i.outstanding == 0 and i.pending_prefill_tokens == 0
        assert not i.prefill_queue and not i.finish_heap and not i.joins


def test_slo_aware_policy_reads_the_router_ledger_and_learns_in_the_simulator():
    # SLO 1 s TTFT, 0.5 s TPOT. r0 (50 tokens) is placed P->D: TTFT 0.5. r1 (80) at 0.01: P's queue
    # would give it 1.3 s, so Splitwise's fallback has D prefill it itself (0.01-0.81, TTFT 0.8).
    # r2 (300) at 0.02: 3.5 s predicted on P, D has no room in its TTFT either: refused at once
    # (ttft_unmet is not a reason waiting cures). r0's KV waits for D's prefill: joins at 0.81.
    from pdserve.router.latency_model import LatencyModel
    from pdserve.router.slo_policy import SloAware
    from pdserve.shared.slo import Priority, RequestSlo
    from pdserve.shared.slo_config import SloRoutingConfig

    model = LatencyModel(LINEAR, kv_bytes_per_token=1, bandwidth_bps=1e12, handoff_latency_s=0.0)
    sim = Simulator(split(), SloAware(SloRoutingConfig(), model), SimConfig(chunked_prefill=True, link=NO_TRANSFER))
    res = sim.run(trace([0.0, 0.01, 0.02], [50, 80, 300], [5, 5, 5]), slos=RequestSlo(1.0, 0.5, Priority.INTERACTIVE))
    np.testing.assert_allclose(res.first_token[:2], [0.5, 0.81])
    assert res.colocated[:2].tolist() == [False, True]
    assert res.reject_reason[:2] == [None, None] and "ttft_unmet" in res.reject_reason[2]
    assert np.isnan(res.finish[2])
    # what the live controller observes, observed: TTFTs, decode gaps, and r0's first gap (0.81 + 0.1 - 0.5)
    assert {("p0", "prefill"), ("d0", "prefill"), ("d0", "decode"), ("d0", "handoff")} <= set(model.fits)
    assert model.fits[("d0", "handoff")].sy == pytest.approx(0.41, abs=1e-6)
    assert all(not tickets for tickets in sim.view.ledger._tickets.values())  # every ticket closed


def test_slo_aware_refusals_that_capacity_cures_wait_until_their_deadline():
    # one mixed instance with KV for one request at a time: r1 waits (no KV room, queueable) until r0
    # frees its blocks at 1.0 -> placed then, within its 5 s TTFT; r2 with a 0.5 s TTFT target waits
    # until its deadline (arrival + 0.5 s) and is refused then.
    from pdserve.router.latency_model import LatencyModel
    from pdserve.router.slo_policy import SloAware
    from pdserve.shared.slo import Priority, RequestSlo
    from pdserve.shared.slo_config import SloRoutingConfig

    model = LatencyModel(LINEAR, kv_bytes_per_token=1, bandwidth_bps=1e12, handoff_latency_s=0.0)
    instances = [InstanceSpec("m0", Role.MIXED, "x", LINEAR, 64)]
    sim = Simulator(instances, SloAware(SloRoutingConfig(), model), SimConfig(chunked_prefill=True, link=NO_TRANSFER))
    slo, short = RequestSlo(5.0, 1.0, Priority.INTERACTIVE), RequestSlo(0.5, 1.0, Priority.INTERACTIVE)
    res = sim.run(trace([0.0, 0.1, 0.2], [40, 40, 40], [6, 6, 6]), slos=[slo, slo, short])
    np.testing.assert_allclose(res.finish[0], 0.4 + 0.5)  # prefill 0.4, 5 steps
    assert res.reject_reason[0] is None and res.reject_reason[1] is None
    assert res.first_token[1] == pytest.approx(0.9 + 0.4)
    assert "deadline" in res.reject_reason[2]


def test_per_prompt_engine_time_is_serial_on_the_prefill_instance():
    # prefill_request_s 0.2: the step that finishes a prompt takes 0.2 s longer. r0 (50) 0-0.7;
    # r1 (50) at 0.1 waits for it: 0.7-1.4 (a dispatch delay would not have queued it)
    over = ServingOverheads(prefill_request_s=0.2)
    _, res = run(split(), trace([0.0, 0.1], [50, 50], [1, 1]), chunked_prefill=True, overheads=over)
    np.testing.assert_allclose(res.first_token, [0.7, 1.4])
    # a chunk that does not finish its prompt pays nothing: 150 tokens in budget 100 -> 1.0, then 0.5 + 0.2
    _, res = run(split(), trace([0.0], [150], [1]), chunked_prefill=True, max_prefill_tokens=100, overheads=over)
    np.testing.assert_allclose(res.first_token, [1.7])


def test_cached_prompt_tokens_are_not_prefilled():
    # r0's 150 tokens, 140 of them in the prefix cache: 10 computed -> 0.1 s
    _, res = run(mixed(), trace([0.0], [150], [1]), chunked_prefill=True)
    np.testing.assert_allclose(res.first_token, [1.5])
    sim = Simulator(mixed(), make_policy("round_robin"), SimConfig(chunked_prefill=True, link=NO_TRANSFER))
    np.testing.assert_allclose(sim.run(trace([0.0], [150], [1]), cached=[140]).first_token, [0.1])
