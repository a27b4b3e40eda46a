"""The SLO-aware policy and its latency model on synthetic snapshots (no engines)."""

from __future__ import annotations

import pytest

from pdserve.router.latency_model import LatencyModel, load_latency_model
from pdserve.router.registry import make_policy
from pdserve.router.slo_policy import SloAware, account
from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot, Placement, Rejection, RequestInfo
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
    m = model(weight=0.5)
    d = inst("d0", Role.DECODE)
    before = m.decode_step(d, 1, None)
    for _ in range(20):
        m.observe_step(d, 1, None, 2 * before)  # the engine runs twice as slow as its profile
    assert m.decode_step(d, 1, None) == pytest.approx(2 * before, rel=1e-3)
    assert m.decode_step(inst("d1", Role.DECODE), 1, None) == pytest.approx(before)  # per instance
    m.observe("d0", "decode", 0.0, 1.0)  # nothing to learn from a zero prediction
    m.observe("d0", "decode", 1.0, 1e9)  # a wild observation is clamped
    assert m.factor("d0", "decode") <= 20.0


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
