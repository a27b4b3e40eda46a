"""The SLO-aware policy and its latency model on synthetic snapshots (no engines)."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.router.latency_model import LatencyModel, load_latency_model
from pdserve.router.registry import make_policy
from pdserve.router.slo_policy import SloAware, account
from pdserve.router.snapshot import ClusterSnapshot, DecodeLoad, InstanceSnapshot, Placement, Rejection, RequestInfo
from pdserve.shared.roles import Role
from pdserve.shared.slo import DecisionReason as R
from pdserve.shared.slo import Priority, RequestSlo
from pdserve.shared.slo_config import PerfModelConfig, SloRoutingConfig


class Linear:
    """prefill: 1 ms per token; decode step: 10 ms + 1 ms per request in the batch."""

    def prefill_time(self, batch_tokens: int) -> float:
        return 0.001 * batch_tokens

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float:
        return 0.010 + 0.001 * batch_size


def model(**kw) -> LatencyModel:
    return LatencyModel(Linear(), kv_bytes_per_token=0.0, handoff_latency_s=0.0, max_prefill_tokens=100_000, **kw)


def policy(**admission) -> SloAware:
    admission.setdefault("slo_margin", 0.0)  # exact arithmetic; the margin has its own tests
    cfg = SloRoutingConfig()
    cfg.admission = cfg.admission.model_copy(update=admission)
    return SloAware(cfg, model())


def inst(iid: str, role: Role, **kw) -> InstanceSnapshot:
    kw.setdefault("kv_blocks_total", 1000)
    kw.setdefault("kv_blocks_free", kw["kv_blocks_total"])
    return InstanceSnapshot(iid, role, **kw)


def req(prompt=100, out=50, ttft=1.0, tpot=0.05, priority=Priority.INTERACTIVE, rid="r") -> RequestInfo:
    return RequestInfo(rid, prompt, out, slo=RequestSlo(ttft, tpot, priority))


def snap(*instances) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(instances))


def test_places_on_most_headroom_with_predictions():
    s = snap(inst("p0", Role.PREFILL, outstanding_prefill_tokens=500), inst("p1", Role.PREFILL),
             inst("d0", Role.DECODE, outstanding=20), inst("d1", Role.DECODE, outstanding=2))
    d = policy().decide(req(), s)
    assert isinstance(d, Placement) and (d.prefill, d.decode, d.reason) == ("p1", "d1", R.PLACED)
    assert d.predicted_ttft_s == pytest.approx(0.1)  # 100 tokens, empty queue
    assert d.predicted_tpot_s == pytest.approx(0.013)  # batch of 2 + this one


def test_all_full_is_a_retryable_rejection_with_retry_after():
    s = snap(inst("p0", Role.PREFILL, kv_blocks_free=0), inst("d0", Role.DECODE, kv_blocks_free=0),
             inst("d1", Role.DECODE, kv_blocks_free=3))
    d = policy().decide(req(), s)
    assert isinstance(d, Rejection) and d.retryable and d.code is R.NO_KV_ROOM
    assert d.retry_after_s >= 1.0 and "no_kv_room" in d.reason


def test_never_fits_is_final():
    d = policy().decide(req(prompt=20_000), snap(inst("p0", Role.PREFILL), inst("d0", Role.DECODE)))
    assert isinstance(d, Rejection) and not d.retryable and d.code is R.NEVER_FITS


def test_dead_instance_is_skipped_and_all_dead_rejected():
    s = snap(inst("p0", Role.PREFILL), inst("d0", Role.DECODE, healthy=False), inst("d1", Role.DECODE, outstanding=30))
    d = policy().decide(req(), s)
    assert isinstance(d, Placement) and d.decode == "d1"
    dead = snap(inst("p0", Role.PREFILL, healthy=False), inst("d0", Role.DECODE, healthy=False))
    assert policy().decide(req(), dead).code is R.NO_INSTANCE


def test_prefill_queue_breaking_ttft_moves_to_the_other_prefill_or_rejects():
    long_queue = inst("p0", Role.PREFILL, outstanding_prefill_tokens=950)  # 0.95 s + 0.1 s > 1 s
    s = snap(long_queue, inst("p1", Role.PREFILL, outstanding_prefill_tokens=300), inst("d0", Role.DECODE))
    assert policy().decide(req(), s).prefill == "p1"
    s = snap(long_queue, inst("d0", Role.DECODE))
    d = policy(mixed_fallback=False).decide(req(), s)
    assert isinstance(d, Rejection) and d.code is R.TTFT_UNMET
    assert "1050 ms on p0" in d.reason and d.retry_after_s == pytest.approx(1.0)  # 50 ms over, floor 1 s


def test_decode_batch_breaking_tpot():
    s = snap(inst("p0", Role.PREFILL), inst("d0", Role.DECODE, outstanding=45), inst("d1", Role.DECODE, outstanding=30))
    d = policy().decide(req(tpot=0.045), s)  # d0: 10 + 46 = 56 ms; d1: 41 ms
    assert d.decode == "d1"
    s = snap(inst("p0", Role.PREFILL, kv_blocks_free=0), inst("d0", Role.DECODE, outstanding=45))
    d = policy().decide(req(tpot=0.045), s)
    assert isinstance(d, Rejection) and d.code is R.TPOT_UNMET and "56 ms on d0" in d.reason


def test_mixed_fallback_decode_prefills_a_short_prompt():
    s = snap(inst("p0", Role.PREFILL, outstanding_prefill_tokens=5000), inst("d0", Role.DECODE, num_running=4))
    d = policy().decide(req(prompt=100), s)
    assert (d.prefill, d.decode, d.reason) == ("d0", "d0", R.FALLBACK_DECODE_PREFILLS)
    assert d.predicted_ttft_s == pytest.approx(0.104)  # its running batch rides along
    long = policy(fallback_max_prompt_tokens=50).decide(req(prompt=100), s)
    assert isinstance(long, Rejection) and long.code is R.TTFT_UNMET


def test_mixed_fallback_prefill_decodes_when_no_decode_meets_tpot():
    s = snap(inst("p0", Role.PREFILL), inst("d0", Role.DECODE, outstanding=100))
    d = policy().decide(req(tpot=0.05), s)
    assert (d.prefill, d.decode, d.reason) == ("p0", "p0", R.FALLBACK_PREFILL_DECODES)
    assert isinstance(policy(mixed_fallback=False).decide(req(tpot=0.05), s), Rejection)


def test_batch_yields_kv_headroom_to_interactive():
    # 150 tokens -> 10 blocks; 12 free of 100: interactive fits, batch must leave 10 (P full: no fallback)
    s = snap(inst("p0", Role.PREFILL, kv_blocks_free=0), inst("d0", Role.DECODE, kv_blocks_total=100, kv_blocks_free=12))
    assert isinstance(policy().decide(req(), s), Placement)
    d = policy().decide(req(priority=Priority.BATCH, ttft=30, tpot=1), s)
    assert isinstance(d, Rejection) and d.code is R.BATCH_YIELDS


def test_colocated_cluster_uses_mixed_instances():
    s = snap(inst("m0", Role.MIXED, outstanding_prefill_tokens=2000), inst("m1", Role.MIXED, outstanding=3))
    d = policy().decide(req(), s)
    assert (d.prefill, d.decode) == ("m1", "m1")
    s = snap(inst("m0", Role.MIXED, outstanding_prefill_tokens=2000))
    assert policy().decide(req(), s).code is R.TTFT_UNMET


def test_optimistic_accounting_spreads_a_burst_of_50_between_polls():
    pol = policy(mixed_fallback=False)
    s = snap(inst("p0", Role.PREFILL), inst("p1", Role.PREFILL),
             inst("d0", Role.DECODE, kv_blocks_total=200, kv_blocks_free=200),
             inst("d1", Role.DECODE, kv_blocks_total=200, kv_blocks_free=200))
    placed: dict[str, int] = {}
    rejected = []
    for k in range(50):
        r = req(prompt=64, out=64, ttft=2.0, tpot=0.05, rid=f"r{k}")
        d = pol.decide(r, s)
        if isinstance(d, Rejection):
            rejected.append(d)
            continue
        placed[d.decode] = placed.get(d.decode, 0) + 1
        placed[d.prefill] = placed.get(d.prefill, 0) + 1
        s = account(s, r, d)
    # 8 blocks a request: 25 fit each D; TTFT (queue of 64-token prompts, 1 ms each) allows ~31 per P
    assert abs(placed["d0"] - placed["d1"]) <= 1 and abs(placed["p0"] - placed["p1"]) <= 1
    assert placed["d0"] + placed["d1"] == 50 and not rejected
    assert all(i.kv_blocks_free == 0 for i in s.by_role(Role.DECODE))
    nxt = pol.decide(req(prompt=64, out=64, ttft=2.0, tpot=0.05), s)
    assert isinstance(nxt, Rejection) and nxt.code is R.NO_KV_ROOM  # a 51st no longer fits: never herded


def test_calibration_moves_predictions_toward_observations():
    m = model(weight=0.5, step_weight=0.5)
    d = inst("d0", Role.DECODE)
    before = m.decode_step(d, 1, None)
    for _ in range(20):
        m.observe_step(d, 1, None, 2 * before)  # the engine runs twice as slow as its profile
    assert m.decode_step(d, 1, None) == pytest.approx(2 * before, rel=1e-3)
    assert m.decode_step(inst("d1", Role.DECODE), 1, None) == pytest.approx(before)  # per instance
    m.observe("d0", "decode", 0.0, 1.0)  # nothing to learn from a zero prediction
    m.observe("d0", "decode", 1.0, 1e9)  # a wild observation is clamped
    assert m.factor("d0", "decode") <= 20.0


def test_calibration_learns_a_fixed_cost_not_only_a_ratio():
    # the instance takes 40 ms more than 1.5x its profile (a reservation round trip before P starts)
    m, p = model(weight=0.1), inst("p0", Role.PREFILL)
    for i in range(60):
        tokens = 50 + (i * 37) % 500
        m.observe("p0", "prefill", m.profiled_ttft(p, tokens), 0.040 + 1.5 * m.profiled_ttft(p, tokens))
    for tokens in (20, 300, 900):  # short and long prompts alike (a ratio would miss one or the other)
        assert m.ttft(p, tokens) == pytest.approx(0.040 + 1.5 * 0.001 * tokens, rel=0.05)
    # decode gaps at several batches: the step model's line, per instance
    for i in range(400):
        batch = 1 + i % 12
        m.observe_gap("d0", batch, None, 0.003 + 2.0 * (0.010 + 0.001 * batch))
    d = inst("d0", Role.DECODE)
    assert m.decode_step(d, 8, None) == pytest.approx(0.003 + 2.0 * 0.018, rel=0.05)


def test_profile_model_and_registry():
    m = load_latency_model(PerfModelConfig())  # the bundled demo CPU profile
    p = inst("p0", Role.PREFILL)
    assert 0.1 < m.prefill_time(p, 256) < 0.4  # measured ~0.21 s for 256 tokens on 2 cores
    assert m.prefill_time(p, 512) > m.prefill_time(p, 256)
    assert make_policy("slo_aware").name == "slo_aware"


def test_config_resolves_request_over_class_defaults():
    cfg = SloRoutingConfig()
    assert cfg.resolve() == RequestSlo(2.0, 0.2, Priority.INTERACTIVE)
    assert cfg.resolve(tpot_ms=50, priority=Priority.BATCH) == RequestSlo(30.0, 0.05, Priority.BATCH)


# -- every request decoding stays within its TPOT; refusals forecast their slots ---------------------

def test_a_join_that_would_break_an_admitted_requests_tpot_goes_elsewhere_or_is_refused():
    # d0: one request with 40 tokens left and 0.5 s of budget: at batch 1 (11 ms) it needs 0.44 s, at
    # batch 2 (12 ms) 0.48 s: fits; d1's request has 0.45 s: a join (0.48 s) would make it miss.
    tight = inst("d1", Role.DECODE, outstanding=1, decoding=(DecodeLoad(40, 0.45, 100),))
    roomy = inst("d0", Role.DECODE, outstanding=1, decoding=(DecodeLoad(40, 0.50, 100),))
    newcomer = req(prompt=10, out=20, tpot=0.05)  # it alone would meet 50 ms anywhere
    d = policy().decide(newcomer, snap(inst("p0", Role.PREFILL), tight, roomy))
    assert isinstance(d, Placement) and d.decode == "d0"
    d = policy(mixed_fallback=False).decide(newcomer, snap(inst("p0", Role.PREFILL), tight))
    assert isinstance(d, Rejection) and d.code is R.TPOT_UNMET and "decoding there" in d.reason
    # a request already past its budget is lost anyway: it does not hold the instance against others
    lost = inst("d1", Role.DECODE, outstanding=1, decoding=(DecodeLoad(40, 0.30, 100),))
    assert isinstance(policy().decide(newcomer, snap(inst("p0", Role.PREFILL), lost)), Placement)


def test_departures_count_a_request_leaving_early_frees_its_share_of_the_batch():
    # two decoding: one ends in 5 tokens; the other (40 left, 0.45 s budget) sees batch 3 for 5 steps,
    # then batch 2: 5 x 13 + 35 x 12 = 485 ms > 450: refused; with 0.49 s: placed.
    def d(budget):
        return inst("d0", Role.DECODE, outstanding=2, decoding=(DecodeLoad(5, 1.0, 50), DecodeLoad(40, budget, 50)))
    newcomer = req(prompt=10, out=60, tpot=0.05)
    assert isinstance(policy(mixed_fallback=False).decide(newcomer, snap(inst("p0", Role.PREFILL), d(0.45))),
                      Rejection)
    assert isinstance(policy(mixed_fallback=False).decide(newcomer, snap(inst("p0", Role.PREFILL), d(0.49))),
                      Placement)


def test_a_decode_instance_prefilling_itself_must_not_stall_its_decodes_past_their_targets():
    # P is saturated (1 s queue > 0.5 s TTFT): the fallback would have D prefill 100 tokens (100 ms),
    # a stall its decoding request (20 left, 0.25 s budget, 12 ms steps: 240 ms) cannot absorb
    p0 = inst("p0", Role.PREFILL, outstanding_prefill_tokens=1000)
    d0 = inst("d0", Role.DECODE, outstanding=1, decoding=(DecodeLoad(20, 0.25, 50),))
    d = policy().decide(req(prompt=100, out=20, ttft=0.5, tpot=0.05), snap(p0, d0))
    assert isinstance(d, Rejection) and d.code is R.TTFT_UNMET
    d0 = inst("d0", Role.DECODE, outstanding=1, decoding=(DecodeLoad(20, 0.40, 50),))  # room for the stall
    d = policy().decide(req(prompt=100, out=20, ttft=0.5, tpot=0.05), snap(p0, d0))
    assert isinstance(d, Placement) and d.reason is R.FALLBACK_DECODE_PREFILLS and d.prefill == "d0"


def test_a_tpot_refusal_forecasts_its_slots_from_the_decoding_requests_ends():
    # 20 ms target: batches up to 10 meet it (10 + 10 = 20 ms). Ten decoding, ending after 100, 105, ...
    # tokens at 20 ms a step: the 1st slot opens as the first ends (100 x 20 ms), the 2nd 5 steps of 19 ms on.
    loads = tuple(DecodeLoad(100 + 5 * i, 10.0, 50) for i in range(10))
    d0 = inst("d0", Role.DECODE, outstanding=10, decoding=loads)
    d = policy(mixed_fallback=False).decide(req(prompt=10, out=20, tpot=0.020), snap(inst("p0", Role.PREFILL), d0))
    assert isinstance(d, Rejection) and d.code is R.TPOT_UNMET
    assert d.slots_in_s[:2] == pytest.approx((2.0, 2.0 + 5 * 0.019))
    assert d.retry_after_s == pytest.approx(2.0)  # Retry-After: the first slot
    assert d.ttft_after_s == pytest.approx(0.010)
    # KV is the limit: room for one more only once 2 requests' blocks are back
    full = inst("d0", Role.DECODE, outstanding=2, kv_blocks_total=10, kv_blocks_free=0,
                decoding=(DecodeLoad(5, 10.0, 64), DecodeLoad(10, 10.0, 64)))
    d = policy(mixed_fallback=False).decide(req(prompt=100, out=28, tpot=1.0), snap(inst("p0", Role.PREFILL), full))
    assert d.code is R.NO_KV_ROOM and d.slots_in_s == pytest.approx((5 * 0.012 + 5 * 0.011,))
    # a target no batch meets: nothing to wait for
    d = policy(mixed_fallback=False).decide(req(prompt=10, out=20, tpot=0.005), snap(inst("p0", Role.PREFILL), d0))
    assert d.slots_in_s == ()


def test_the_margin_keeps_a_share_of_each_target_free():
    s = snap(inst("p0", Role.PREFILL), inst("d0", Role.DECODE, outstanding=8))
    newcomer = req(prompt=100, out=20, ttft=1.0, tpot=0.0195)  # 19 ms predicted: 97 % of the target
    assert isinstance(policy(slo_margin=0.0, mixed_fallback=False).decide(newcomer, s), Placement)
    assert isinstance(policy(slo_margin=0.1, mixed_fallback=False).decide(newcomer, s), Rejection)


def test_tpot_forecast_counts_departures_and_arrivals():
    m = model()
    d = inst("d0", Role.DECODE, outstanding=4, decoding=tuple(DecodeLoad(10, 1.0, 10) for _ in range(4)))
    # 4 leave after 10 of its 100 tokens: ~ 10 steps at batch 5, then batch 1
    assert m.tpot(d, 10, 101) == pytest.approx((10 * 0.015 + 90 * 0.011) / 100, rel=0.02)  # in chunks of steps
    busy = dataclasses.replace(d, decode_rate=50.0)  # 50 joins a second, capped at a batch of 6
    assert m.tpot(d, 10, 101) < m.tpot(busy, 10, 101, max_batch=6) <= 0.016
