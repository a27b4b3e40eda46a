"""SLO-aware placement: every request against its own TTFT and TPOT targets.

Pure, like every policy: `decide(request, snapshot)` reads the snapshot and a
`LatencyModel`, returns a decision. Order of choice, as the design says:
  1. D first: instances with KV room for prompt + max_tokens whose predicted
     TPOT with this request added stays within its SLO; the most headroom wins.
  2. Then P: predicted TTFT (prompts queued ahead + this prefill) within the
     SLO, the most headroom (the lowest predicted TTFT) wins.
  3. Splitwise's mixed pool, when allowed: no P meets TTFT -> the chosen D
     prefills a short prompt itself; no D meets TPOT or has room -> a P with
     room decodes too. On a colocated cluster each instance is P and D at once.
  4. Otherwise a Rejection naming the reason (`code`) and a Retry-After guess;
     the admission queue decides whether it waits or is refused.
Batch-class requests yield: they must leave `batch_kv_reserve` of a D's KV free.
`account()` applies a placement to a snapshot (optimistic accounting): the next
decision sees it at once, before the next stats poll corrects the counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdserve.router.latency_model import LatencyModel, load_latency_model
from pdserve.router.policy import PlacementPolicy, _could_ever_fit, _has_room
from pdserve.router.snapshot import ClusterSnapshot, Decision, InstanceSnapshot, Placement, Rejection, RequestInfo
from pdserve.shared.roles import Role
from pdserve.shared.slo import DecisionReason as R
from pdserve.shared.slo import Priority, RequestSlo
from pdserve.shared.slo_config import SloRoutingConfig


@dataclass(frozen=True)
class _Option:
    instance: InstanceSnapshot
    predicted_s: float
    ratio: float  # predicted / target: below 1 meets the SLO; lower is more headroom


class SloAware(PlacementPolicy):
    """Placement against each request's SLO on a latency model; see the module docstring."""

    name = "slo_aware"

    def __init__(self, config: SloRoutingConfig | None = None, model: LatencyModel | None = None) -> None:
        self.config = config or SloRoutingConfig()
        self.model = model or load_latency_model(self.config.perf)

    def decide(self, request: RequestInfo, snapshot: ClusterSnapshot) -> Decision:
        slo = request.slo or self.config.resolve()
        prefills, decodes = snapshot.by_role(Role.PREFILL), snapshot.by_role(Role.DECODE)
        everyone = tuple(i for i in snapshot.instances if i.healthy)
        if not everyone:
            return Rejection(request.request_id, "no healthy instance to serve the request", code=R.NO_INSTANCE,
                             retry_after_s=self.config.admission.min_retry_after_s)
        if not any(_could_ever_fit(i, request) for i in everyone):
            return Rejection(request.request_id, f"request needs KV for {request.prompt_tokens + request.max_tokens}"
                             " tokens, more than any instance holds", retryable=False, code=R.NEVER_FITS)
        if prefills and decodes:
            return self._disaggregated(request, slo, prefills, decodes)
        return self._colocated(request, slo, snapshot.by_role(Role.MIXED) or everyone)

    def pick_decode(self, request, candidates):
        slo = request.slo or self.config.resolve()
        return min(self._decode_options(request, slo, candidates, handoff=False) or
                   [_Option(c, 0.0, float("inf")) for c in candidates], key=_key).instance

    def pick_prefill(self, request, candidates):
        return min(self._prefill_options(request, request.slo or self.config.resolve(), candidates), key=_key).instance

    # -- the two phases -----------------------------------------------------------------------
    def _decode_options(self, request: RequestInfo, slo: RequestSlo, candidates, handoff: bool) -> list[_Option]:
        """Candidates with KV room (and the batch reserve), with their predicted TPOT."""
        out = []
        handoff_s = self.model.handoff_time(request.prompt_tokens) if handoff else 0.0
        for d in candidates:
            if not self._room(d, request, slo):
                continue
            tpot = self.model.tpot(d, request.prompt_tokens, request.max_tokens, handoff_s)
            out.append(_Option(d, tpot, tpot / slo.tpot_s))
        return out

    def _prefill_options(self, request: RequestInfo, slo: RequestSlo, candidates) -> list[_Option]:
        out = []
        for p in candidates:
            ttft = self.model.ttft(p, request.prompt_tokens)
            out.append(_Option(p, ttft, ttft / slo.ttft_s))
        return out

    def _room(self, d: InstanceSnapshot, request: RequestInfo, slo: RequestSlo) -> bool:
        if not _has_room(d, request):
            return False
        if slo.priority is Priority.BATCH and d.kv_blocks_total > 0:
            left = d.kv_blocks_free - d.blocks_for(request.prompt_tokens + request.max_tokens)
            return left >= self.config.admission.batch_kv_reserve * d.kv_blocks_total
        return True

    def _disaggregated(self, request, slo, prefills, decodes) -> Decision:
        d_opts = self._decode_options(request, slo, decodes, handoff=True)
        d_ok = [o for o in d_opts if o.ratio <= 1.0]
        p_opts = self._prefill_options(request, slo, prefills)
        p_ok = [o for o in p_opts if o.ratio <= 1.0]
        fallback = self.config.admission.mixed_fallback
        if d_ok:
            d = min(d_ok, key=_key)
            if p_ok:
                p = min(p_ok, key=_key)
                return _place(request, p, d, R.PLACED)
            if fallback and request.prompt_tokens <= self.config.admission.fallback_max_prompt_tokens:
                # the prefill pool is saturated: D computes the short prompt itself (mixed batching)
                own = [o for o in self._prefill_options(request, slo, [x.instance for x in d_ok]) if o.ratio <= 1.0]
                if own:
                    host = min(own, key=_key)
                    tpot = next(o for o in d_ok if o.instance is host.instance)
                    return _place(request, host, tpot, R.FALLBACK_DECODE_PREFILLS)
            return self._reject(request, R.TTFT_UNMET, p_opts, slo)
        if fallback and p_ok:
            # no D meets TPOT (or has room): a P with room takes the tokens too
            pd = {o.instance.instance_id: o for o in self._decode_options(request, slo, [o.instance for o in p_ok],
                                                                         handoff=False) if o.ratio <= 1.0}
            both = [o for o in p_ok if o.instance.instance_id in pd]
            if both:
                p = min(both, key=_key)
                return _place(request, p, pd[p.instance.instance_id], R.FALLBACK_PREFILL_DECODES)
        return self._reject(request, self._decode_reason(request, slo, decodes, d_opts), d_opts or p_opts, slo)

    def _colocated(self, request, slo, candidates) -> Decision:
        d_opts = {o.instance.instance_id: o for o in self._decode_options(request, slo, candidates, handoff=False)}
        both = []
        for p in self._prefill_options(request, slo, [candidates[i] for i in range(len(candidates))
                                                      if candidates[i].instance_id in d_opts]):
            d = d_opts[p.instance.instance_id]
            if p.ratio <= 1.0 and d.ratio <= 1.0:
                both.append((max(p.ratio, d.ratio), p.instance.instance_id, p, d))
        if both:
            _, _, p, d = min(both, key=lambda t: (t[0], t[1]))
            return _place(request, p, d, R.PLACED)
        if not d_opts:
            return self._reject(request, self._decode_reason(request, slo, candidates, []), [], slo)
        if all(o.ratio > 1.0 for o in d_opts.values()):
            return self._reject(request, R.TPOT_UNMET, list(d_opts.values()), slo)
        return self._reject(request, R.TTFT_UNMET, self._prefill_options(request, slo, candidates), slo)

    def _decode_reason(self, request, slo, decodes, d_opts) -> R:
        if d_opts:
            return R.TPOT_UNMET
        if slo.priority is Priority.BATCH and any(_has_room(d, request) for d in decodes):
            return R.BATCH_YIELDS
        return R.NO_KV_ROOM

    def _reject(self, request: RequestInfo, code: R, options: list[_Option], slo: RequestSlo) -> Rejection:
        """A retryable refusal; Retry-After: how far the best candidate is over its target (at least the floor)."""
        floor = self.config.admission.min_retry_after_s
        if options:
            best = min(options, key=_key)
            target = slo.ttft_s if code is R.TTFT_UNMET else slo.tpot_s * max(request.max_tokens, 1)
            over = max(best.predicted_s - target, 0.0) if code is R.TTFT_UNMET else \
                (best.ratio - 1.0) * target
            detail = (f"predicted {'TTFT' if code is R.TTFT_UNMET else 'TPOT'} "
                      f"{best.predicted_s * 1000:.0f} ms on {best.instance.instance_id} exceeds the "
                      f"{(slo.ttft_s if code is R.TTFT_UNMET else slo.tpot_s) * 1000:.0f} ms target")
        else:
            over, detail = 0.0, "no instance has KV room" + (
                " outside the headroom kept for interactive requests" if code is R.BATCH_YIELDS else "")
        return Rejection(request.request_id, f"no placement meets the request's SLO ({code.value}): {detail}",
                         code=code, retry_after_s=max(floor, over))


def _key(o: _Option) -> tuple:
    return (o.ratio, o.instance.kv_usage, o.instance.instance_id)


def _place(request: RequestInfo, p: _Option, d: _Option, reason: R) -> Placement:
    return Placement(request.request_id, prefill=p.instance.instance_id, decode=d.instance.instance_id, reason=reason,
                     predicted_ttft_s=p.predicted_s, predicted_tpot_s=d.predicted_s)


def account(snapshot: ClusterSnapshot, request: RequestInfo, placement: Placement) -> ClusterSnapshot:
    """`snapshot` with `placement` applied: D's KV reserved and batch grown, P's prompt queue grown."""
    blocks = request.prompt_tokens + request.max_tokens
    context = request.prompt_tokens + request.max_tokens // 2
    out = []
    for i in snapshot.instances:
        if i.instance_id == placement.decode:
            i = dataclasses.replace(i, outstanding=i.outstanding + 1, num_waiting=i.num_waiting + 1,
                                    kv_blocks_free=max(i.kv_blocks_free - i.blocks_for(blocks), 0),
                                    # unknown (0) stays unknown: the model then assumes the profile's context
                                    outstanding_context_tokens=i.outstanding_context_tokens + context
                                    if i.outstanding_context_tokens else 0)
        if i.instance_id == placement.prefill:
            i = dataclasses.replace(i, outstanding_prefill_tokens=i.outstanding_prefill_tokens + request.prompt_tokens,
                                    outstanding=i.outstanding + (0 if placement.colocated else 1))
        out.append(i)
    return ClusterSnapshot(tuple(out), snapshot.now)
