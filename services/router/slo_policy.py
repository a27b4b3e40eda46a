"""SLO-aware placement: every request against its own TTFT and TPOT targets.

Pure, like every policy: `decide(request, snapshot)` reads the snapshot and a
`LatencyModel`, returns a decision. Order of choice, as the design says:
  1. D first: instances with KV room for prompt + max_tokens where this request
     meets its TPOT and every request decoding there that meets its TPOT now
     still does with this one in the batch (and with the stall of a prompt D
     would prefill itself); the most headroom (lowest forecast TPOT) wins. Each
     placement keeping everyone within target is what bounds a batch's growth:
     later joins are checked again when they come.
  2. Then P: predicted TTFT (prompts queued ahead + this prefill) within the
     SLO, the most headroom (the lowest predicted TTFT) wins; a P that decodes
     too (fallback) must not stall its own decodes past their targets.
  3. Splitwise's mixed pool, when allowed: no P meets TTFT -> the chosen D
     prefills a short prompt itself; no D meets TPOT or has room -> a P with
     room decodes too. On a colocated cluster each instance is P and D at once.
  4. Otherwise a Rejection naming the reason (`code`), the forecast of when
     the 1st, 2nd, ... request like this one would fit (`slots_in_s`, from the
     decoding requests' predicted ends) and the TTFT it would then get: the
     admission queue refuses at once a request whose slot comes too late.
Every check keeps `slo_margin` of the target free for prediction error.
Batch-class requests yield: they must leave `batch_kv_reserve` of a D's KV free.
`account()` applies a placement to a snapshot (optimistic accounting): the next
decision sees it at once, before the next stats poll corrects the counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pdserve.router.latency_model import LatencyModel, load_latency_model
from pdserve.router.policy import PlacementPolicy, _could_ever_fit, _has_room
from pdserve.router.snapshot import (ClusterSnapshot, Decision, DecodeLoad, InstanceSnapshot, Placement, Rejection,
                                     RequestInfo)
from pdserve.shared.roles import Role
from pdserve.shared.slo import DecisionReason as R
from pdserve.shared.slo import Priority, RequestSlo
from pdserve.shared.slo_config import SloRoutingConfig


@dataclass(frozen=True)
class _Option:
    instance: InstanceSnapshot
    predicted_s: float
    ratio: float  # predicted / target: lower is more headroom
    ok: bool  # meets the request's target (with the margin) without breaking anyone else's
    basis_s: float = 0.0  # the profiled figure behind `predicted_s` (what calibration learns from)


_MAX_BATCH = 512  # no decode batch forecast goes past this


class SloAware(PlacementPolicy):
    """Placement against each request's SLO on a latency model; see the module docstring."""

    name = "slo_aware"

    def __init__(self, config: SloRoutingConfig | None = None, model: LatencyModel | None = None) -> None:
        self.config = config or SloRoutingConfig()
        self.model = model or load_latency_model(self.config.perf)

    @property
    def _keep(self) -> float:
        """The share of a target a prediction may use."""
        return 1.0 - self.config.admission.slo_margin

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
                   [_Option(c, 0.0, float("inf"), False) for c in candidates], key=_key).instance

    def pick_prefill(self, request, candidates):
        return min(self._prefill_options(request, request.slo or self.config.resolve(), candidates), key=_key).instance

    # -- the checks --------------------------------------------------------------------------------
    def _absorbs(self, inst: InstanceSnapshot, join: int, stall_s: float, own_tokens: int | None = None,
                 own_budget_s: float = math.inf, context: float | None = None) -> bool:
        """Every request decoding on `inst` that meets its TPOT now still does with `join` more and `stall_s`.

        With `own_tokens`, the newcomer itself (that many tokens, `own_budget_s` of decode time)
        is one of the `join`. A request already past its budget is not held against others.
        """
        loads = inst.decoding
        fixed = max(self.model.batch_now(inst) - len(loads), 0)  # counted, not known one by one
        if not loads and own_tokens is None:
            return True
        remaining = [d.remaining_tokens for d in loads]
        before = self.model.decode_times(inst, remaining, join=fixed, context_tokens=context)
        extra = [own_tokens] if own_tokens is not None else []
        after = self.model.decode_times(inst, remaining + extra, join=fixed + join - len(extra),
                                        context_tokens=context)
        for d, t0, t1 in zip(loads, before, after):
            if t0 <= d.budget_s and t0 + (t1 - t0 + stall_s) / self._keep > d.budget_s:
                return False
        return own_tokens is None or after[-1] / self._keep <= own_budget_s

    def _max_batch(self, inst: InstanceSnapshot, slo: RequestSlo, context: float | None) -> int:
        """The largest batch whose step meets `slo`'s TPOT with the margin (0 if even one does not)."""
        target = slo.tpot_s * self._keep
        if self.model.decode_step(inst, 1, context) > target:
            return 0
        low, high = 1, 2
        while high < _MAX_BATCH and self.model.decode_step(inst, high, context) <= target:
            low, high = high, high * 2
        high = min(high, _MAX_BATCH)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.model.decode_step(inst, mid, context) <= target else (low, mid)
        return low

    def _context(self, d: InstanceSnapshot, request: RequestInfo) -> float | None:
        return d.outstanding_context_tokens + request.prompt_tokens + request.max_tokens / 2 \
            if d.outstanding_context_tokens else None

    # -- the two phases -----------------------------------------------------------------------
    def _decode_options(self, request: RequestInfo, slo: RequestSlo, candidates, handoff: bool,
                        stall_prompt: bool = False, start_in_s: float = 0.0) -> list[_Option]:
        """Candidates with KV room (and the batch reserve), with their forecast TPOT and whether it is allowed.

        `stall_prompt`: the candidate would prefill the prompt itself, stalling its decodes meanwhile.
        """
        out = []
        gaps = max(request.max_tokens - 1, 1)
        for d in candidates:
            if not self._room(d, request, slo):
                continue
            handoff_s = self.model.handoff_time(request.prompt_tokens, d.instance_id) if handoff else 0.0
            context = self._context(d, request)
            stall = self.model.prefill_time(d, request.prompt_tokens) if stall_prompt else 0.0
            ok = self._absorbs(d, 1, stall, own_tokens=gaps, own_budget_s=slo.tpot_s * gaps - handoff_s / self._keep,
                               context=context)
            tpot = self.model.tpot(d, request.prompt_tokens, request.max_tokens, handoff_s, start_in_s,
                                   max_batch=self._max_batch(d, slo, context))
            basis = self.model.profiled_step(d, self.model.batch_now(d) + 1, context)
            out.append(_Option(d, tpot, tpot / slo.tpot_s, ok, basis))
        return out

    def _prefill_options(self, request: RequestInfo, slo: RequestSlo, candidates) -> list[_Option]:
        """Predicted TTFT; a candidate decoding requests itself must not stall them past their targets."""
        out = []
        for p in candidates:
            ttft = self.model.ttft(p, request.prompt_tokens)
            ok = ttft <= slo.ttft_s * self._keep and (
                not p.decoding or self._absorbs(p, 0, self.model.prefill_time(p, request.prompt_tokens)))
            out.append(_Option(p, ttft, ttft / slo.ttft_s, ok, self.model.profiled_ttft(p, request.prompt_tokens)))
        return out

    def _room(self, d: InstanceSnapshot, request: RequestInfo, slo: RequestSlo) -> bool:
        if not _has_room(d, request):
            return False
        if slo.priority is Priority.BATCH and d.kv_blocks_total > 0:
            left = d.kv_blocks_free - d.blocks_for(request.prompt_tokens + request.max_tokens)
            return left >= self.config.admission.batch_kv_reserve * d.kv_blocks_total
        return True

    def _disaggregated(self, request, slo, prefills, decodes) -> Decision:
        p_opts = self._prefill_options(request, slo, prefills)
        p_ok = [o for o in p_opts if o.ok]
        start = min(o.predicted_s for o in p_opts)
        d_opts = self._decode_options(request, slo, decodes, handoff=True, start_in_s=start)
        d_ok = [o for o in d_opts if o.ok]
        admission = self.config.admission
        if d_ok:
            if p_ok:
                return _place(request, min(p_ok, key=_key), min(d_ok, key=_key), R.PLACED)
            if admission.mixed_fallback and request.prompt_tokens <= admission.fallback_max_prompt_tokens:
                # the prefill pool is saturated: D computes the short prompt itself (mixed batching),
                # stalling its decodes for that long: every one of them must still meet its target
                hosts = [o.instance for o in d_ok]
                own = {o.instance.instance_id: o for o in self._decode_options(request, slo, hosts, handoff=False,
                                                                                stall_prompt=True) if o.ok}
                ttfts = [o for o in self._prefill_options(request, slo, hosts) if o.ok and
                         o.instance.instance_id in own]
                if ttfts:
                    host = min(ttfts, key=_key)
                    return _place(request, host, own[host.instance.instance_id], R.FALLBACK_DECODE_PREFILLS)
            return self._reject(request, R.TTFT_UNMET, p_opts, slo, p_opts)
        if admission.mixed_fallback and p_ok:
            # no D meets TPOT (or has room): a P with room takes the tokens too, its prefills stalling them
            pd = {o.instance.instance_id: o for o in self._decode_options(request, slo, [o.instance for o in p_ok],
                                                                         handoff=False) if o.ok}
            both = [o for o in p_ok if o.instance.instance_id in pd and self._prefill_duty_ok(o.instance, request,
                                                                                              slo, pd)]
            if both:
                p = min(both, key=_key)
                return _place(request, p, pd[p.instance.instance_id], R.FALLBACK_PREFILL_DECODES)
        return self._reject(request, self._decode_reason(request, slo, decodes, d_opts), d_opts or p_opts, slo,
                            p_opts, decodes)

    def _prefill_duty_ok(self, p: InstanceSnapshot, request: RequestInfo, slo: RequestSlo, pd: dict) -> bool:
        """A decode on a prefill instance: the prompts it keeps prefilling (at their recent rate) stall every step."""
        duty = self.model.prefill_time(p, round(p.prefill_token_rate))  # seconds of prefill a second
        if duty >= self._keep:
            return False
        tpot = pd[p.instance_id].predicted_s / (1.0 - duty) + \
            self.model.prefill_time(p, p.outstanding_prefill_tokens) / max(request.max_tokens - 1, 1)
        return tpot <= slo.tpot_s * self._keep

    def _colocated(self, request, slo, candidates) -> Decision:
        ok_room = [c for c in candidates if self._room(c, request, slo)]
        p_opts = {o.instance.instance_id: o for o in self._prefill_options(request, slo, candidates)}
        d_opts = self._decode_options(request, slo, ok_room, handoff=False, stall_prompt=True)
        both = [(max(p_opts[d.instance.instance_id].ratio, d.ratio), d.instance.instance_id,
                 p_opts[d.instance.instance_id], d) for d in d_opts if d.ok and p_opts[d.instance.instance_id].ok]
        if both:
            _, _, p, d = min(both, key=lambda t: (t[0], t[1]))
            return _place(request, p, d, R.PLACED)
        if not d_opts:
            return self._reject(request, self._decode_reason(request, slo, candidates, []), [], slo,
                                list(p_opts.values()), candidates)
        if all(not o.ok for o in d_opts):
            return self._reject(request, R.TPOT_UNMET, d_opts, slo, list(p_opts.values()), candidates)
        return self._reject(request, R.TTFT_UNMET, list(p_opts.values()), slo, list(p_opts.values()))

    def _decode_reason(self, request, slo, decodes, d_opts) -> R:
        if d_opts:
            return R.TPOT_UNMET
        if slo.priority is Priority.BATCH and any(_has_room(d, request) for d in decodes):
            return R.BATCH_YIELDS
        return R.NO_KV_ROOM

    # -- refusals and their forecast ---------------------------------------------------------------
    def slots(self, request: RequestInfo, slo: RequestSlo, decodes) -> tuple[float, ...] | None:
        """Seconds from now until the 1st, 2nd, ... request like `request` would fit on one of `decodes`.

        A slot opens as a decoding request ends (in the order the model forecasts): the batch gets
        one smaller and its KV comes free, until both the batch the TPOT target allows and the
        KV room take one more. None open before a departure: the request was just refused.
        """
        out: list[float] = []
        need_tokens = request.prompt_tokens + request.max_tokens
        if any(d.outstanding > len(d.decoding) for d in decodes):
            return None  # requests counted but not known one by one (no per-request view): no forecast
        for d in decodes:
            context = self._context(d, request)
            cap = self._max_batch(d, slo, context)
            if cap <= 0 or not _could_ever_fit(d, request):
                continue
            loads = sorted(d.decoding, key=lambda x: x.remaining_tokens)
            fixed = max(self.model.batch_now(d) - len(loads), 0)
            ends = self.model.decode_times(d, [x.remaining_tokens for x in loads], join=fixed, context_tokens=context)
            # the router's own count: an engine's batch larger than it is a stats poll behind
            batch, free, opened = max(d.outstanding, len(loads)), d.kv_blocks_free, 0
            reserve = self.config.admission.batch_kv_reserve * d.kv_blocks_total \
                if slo.priority is Priority.BATCH else 0.0
            blocks = max(d.blocks_for(need_tokens), 1)
            for load, end in [(None, 0.0), *zip(loads, ends)]:
                if load is not None:
                    batch, free = batch - 1, free + d.blocks_for(load.kv_tokens)
                room = math.inf if d.kv_blocks_total <= 0 else (free - reserve) // blocks
                fits = int(min(cap - batch, room))
                out.extend([end] * max(fits - opened, 0))
                opened = max(opened, fits)
                if opened >= self.config.admission.max_forecast_slots:
                    break
        return tuple(sorted(out)[:self.config.admission.max_forecast_slots])

    def _reject(self, request: RequestInfo, code: R, options: list[_Option], slo: RequestSlo,
                p_opts: list[_Option] | None = None, decodes=()) -> Rejection:
        """A retryable refusal with the forecast of its slots; Retry-After: the first slot, or how far over."""
        floor = self.config.admission.min_retry_after_s
        slots = self.slots(request, slo, decodes) if code in QUEUE_FORECAST else ()
        ttft_after = min((o.predicted_s for o in p_opts), default=None) if p_opts else None
        if options:
            best = min(options, key=_key)
            target = slo.ttft_s if code is R.TTFT_UNMET else slo.tpot_s * max(request.max_tokens, 1)
            over = max(best.predicted_s - target, 0.0) if code is R.TTFT_UNMET else \
                (best.ratio - 1.0) * target
            detail = (f"predicted {'TTFT' if code is R.TTFT_UNMET else 'TPOT'} "
                      f"{best.predicted_s * 1000:.0f} ms on {best.instance.instance_id} "
                      + (f"exceeds the {slo.ttft_s * 1000:.0f} ms target" if code is R.TTFT_UNMET else
                         f"against the {slo.tpot_s * 1000:.0f} ms target: it, or a request decoding there, "
                         "would miss its target"))
        else:
            over, detail = 0.0, "no instance has KV room" + (
                " outside the headroom kept for interactive requests" if code is R.BATCH_YIELDS else "")
        retry = slots[0] if slots else max(over, 0.0)
        return Rejection(request.request_id, f"no placement meets the request's SLO ({code.value}): {detail}",
                         code=code, retry_after_s=max(floor, retry), slots_in_s=slots, ttft_after_s=ttft_after)


# Refusals whose cure is a decode slot freeing up: these carry a forecast of when
QUEUE_FORECAST = frozenset({R.NO_KV_ROOM, R.TPOT_UNMET, R.BATCH_YIELDS})


def _key(o: _Option) -> tuple:
    return (o.ratio, o.instance.kv_usage, o.instance.instance_id)


def _place(request: RequestInfo, p: _Option, d: _Option, reason: R) -> Placement:
    return Placement(request.request_id, prefill=p.instance.instance_id, decode=d.instance.instance_id, reason=reason,
                     predicted_ttft_s=p.predicted_s, predicted_tpot_s=d.predicted_s,
                     basis=(p.basis_s, d.basis_s, float(request.prompt_tokens)))


def account(snapshot: ClusterSnapshot, request: RequestInfo, placement: Placement) -> ClusterSnapshot:
    """`snapshot` with `placement` applied: D's KV reserved and batch grown, P's prompt queue grown."""
    blocks = request.prompt_tokens + request.max_tokens
    budget = math.inf if request.slo is None else request.slo.tpot_s * max(request.max_tokens - 1, 1)
    context = request.prompt_tokens + request.max_tokens // 2
    out = []
    for i in snapshot.instances:
        if i.instance_id == placement.decode:
            i = dataclasses.replace(i, outstanding=i.outstanding + 1, num_waiting=i.num_waiting + 1,
                                    kv_blocks_free=max(i.kv_blocks_free - i.blocks_for(blocks), 0),
                                    # unknown (0) stays unknown: the model then assumes the profile's context
                                    outstanding_context_tokens=i.outstanding_context_tokens + context
                                    if i.outstanding_context_tokens else 0,
                                    decoding=i.decoding + (DecodeLoad(request.max_tokens, budget, blocks),))
        if i.instance_id == placement.prefill:
            i = dataclasses.replace(i, outstanding_prefill_tokens=i.outstanding_prefill_tokens + request.prompt_tokens,
                                    outstanding=i.outstanding + (0 if placement.colocated else 1))
        out.append(i)
    return ClusterSnapshot(tuple(out), snapshot.now)
