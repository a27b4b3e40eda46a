"""Discrete-event simulator of a prefill/decode cluster, driven by a trace.

Placement and admission are the router's own: every arrival is decided by a
`pdserve.router` `PlacementPolicy` reading a `ClusterSnapshot` built from the
simulated instances, exactly as the live controller builds one from engine
stats. The core is pure: no I/O, no clocks; a run is deterministic.

Instance model (one engine; `sim_config.py` has the two schedulers):
- An iteration is either a prefill iteration (FIFO prompts up to
  `max_prefill_tokens`, at least one; the running decode batch rides along
  and advances one token: mixed batching) or a decode run. With
  `chunked_prefill` (vLLM V1) a prefill iteration is one step whose token
  budget the decodes share, and a long prompt is cut into chunks over
  consecutive steps; its first token comes at the end of its last chunk.
- A decode run is a sequence of equal steps with an unchanged batch. It is
  simulated as one event that ends when the first request of the batch
  finishes; an arrival (a prompt to prefill, a KV cache to join) cuts it at
  the next step boundary. Events grow with requests, not tokens, which is
  what makes an hour of trace on 70 machines take seconds.
- A decode instance reserves KV for prompt + output tokens before the
  request's prefill starts, so nothing is ever preempted; the reservation is
  freed when the request finishes. A request the policy places where KV is
  short (the base policies queue rather than refuse) waits at that instance,
  FIFO, until blocks free up; its wait counts in TTFT.
- KV handoff from a prefill instance to a different decode instance:
  layer-wise sending hides up to `overlap` of the bytes behind the prefill
  that produces them (at most the link's bandwidth x the prefill's duration,
  split over the batch's prompts by size); the rest crosses the link after
  the prefill, sharing the bandwidth of the prefill machine's link and of
  the decode machine's link with every other transfer in flight there
  (`links.py`, max-min fair), then `latency` is added. Alone on its links a
  transfer takes `latency + max(T * (1 - overlap), T - prefill_duration)`,
  T = prompt tokens x KV bytes per token / bandwidth; `LinkConfig.shared =
  False` gives that for every transfer. The first token is emitted at the
  end of the prefill: TTFT never waits for the handoff.
- Serving overheads (`ServingOverheads`, zero unless set): a prompt enters
  its engine's queue `dispatch_s` after it arrives; disaggregated, it waits
  first for D's next step boundary and `reservation_s` (D's reservation
  reaching P), and D runs one step more than the tokens it adds (its first
  step recomputes the prompt's last token and samples P's token again).

Admission: a retryable rejection (a policy that refuses when KV is short)
waits in the router's FIFO queue and is re-decided whenever a request
finishes, up to `admission_timeout_s`; non-retryable ones are rejected at
once. Every request ends either finished or rejected with the policy's reason.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import deque

import numpy as np

from pdserve.planner.links import SharedLinks
from pdserve.planner.perf_model import PerfModel
from pdserve.planner.prefix_cache import PrefixCacheModel, Sessions
from pdserve.planner.sim_config import LinkConfig, ServingOverheads, SimConfig  # noqa: F401 - re-exported
from pdserve.planner.sim_router import RouterView, model_of
from pdserve.planner.sim_types import InstanceSpec, SimResult, _Instance  # noqa: F401 - re-exported
from pdserve.planner.trace import Trace
from pdserve.router.policy import PlacementPolicy
from pdserve.router.snapshot import ClusterSnapshot, InstanceSnapshot, Placement, RequestInfo
from pdserve.shared.slo import RequestSlo
from pdserve.shared.roles import Role

_ARRIVE, _ITER_END, _KV_READY, _LINK, _ENQUEUE, _POLL = 0, 1, 2, 3, 4, 5
_EPS = 1e-9


class Simulator:
    """One cluster, one policy; `run(trace)` may be called once."""

    def __init__(self, instances: list[InstanceSpec], policy: PlacementPolicy, config: SimConfig | None = None):
        self.cfg = config or SimConfig()
        self.policy = policy
        bs = self.cfg.block_size
        self.inst = [_Instance(s, s.kv_tokens // bs, s.kv_tokens // bs, pos=k) for k, s in enumerate(instances)]
        self.index = {s.instance_id: i for i, s in enumerate(instances)}
        if len(self.index) != len(instances):
            raise ValueError("instance ids must be unique")
        self.events: list = []
        self.seq = 0
        self.admission: deque = deque()
        self.links = SharedLinks(self.cfg.link.bandwidth_gbps * 1e9)
        self._snaps: list = [None] * len(self.inst)
        self._dirty: set[int] = set(range(len(self.inst)))
        # a policy on a latency model (slo_aware) reads the router's ledger and learns from what it sees
        self.view = RouterView(policy, [s.instance_id for s in instances]) if model_of(policy) else None
        self._polling = False

    # ---- event plumbing
    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def run(self, trace: Trace, sessions: Sessions | None = None,
            slos: RequestSlo | list[RequestSlo | None] | None = None, cached: list[int] | None = None) -> SimResult:
        """Simulate the trace; with `sessions`, every instance has a prefix cache (`prefix_cache`).

        `slos`: each request's SLO as a client sends it (one for all, or one per request; None:
        the policy's defaults). `cached`: prompt tokens of each request already in every
        instance's prefix cache when the run starts (earlier runs on the same server).
        """
        wall0 = time.perf_counter()
        n = len(trace)
        self.slos = slos if isinstance(slos, list) else [slos] * n
        self.arrival, self.prompt, self.output = trace.arrival, trace.prompt.tolist(), trace.output.tolist()
        self.cache = PrefixCacheModel([i.spec.kv_tokens for i in self.inst]) if sessions is not None else None
        self.session = sessions.session.tolist() if sessions is not None else [-1] * n
        self.shared = sessions.shared.tolist() if sessions is not None else [0] * n
        self.compute = list(self.prompt)  # prompt tokens the prefill instance computes
        if cached is not None:  # vLLM computes at least the prompt's last token
            self.compute = [p - min(c, p - 1) for p, c in zip(self.prompt, cached)]
        self.done = [0] * n  # chunked prefill: prompt tokens computed so far
        self.prefill_start = [0.0] * n  # when the request's first prefill chunk started
        self.kv_sent = [0] * n
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.handoff = np.zeros(n)
        self.placement: list[tuple[int, int] | None] = [None] * n
        self.join_step = [0] * n
        self.reasons: list[str | None] = [None] * n
        arrivals = trace.arrival.tolist()
        for r, t in enumerate(arrivals):  # pre-sorted: a heap of arrivals would only cost time
            self.events.append((t, r - n, _ARRIVE, r, 0))
        heapq.heapify(self.events)
        count, now = 0, 0.0
        while self.events:
            now, _, kind, a, b = heapq.heappop(self.events)
            count += 1
            if kind == _ARRIVE:
                self._arrive(a, now)
            elif kind == _ITER_END:
                self._iteration_end(self.inst[a], b, now)
            elif kind == _KV_READY:
                self._kv_ready(a, b, now)
            elif kind == _ENQUEUE:
                self._enqueue(a, now)
            elif kind == _POLL:
                self._poll(now)
            elif a == self.links.version:  # _LINK; a stale one (rates changed since) is ignored
                self._link_done(now)
        for r in self.admission:
            self._reject(r, "still waiting for KV room when the trace ended")
        self.admission.clear()
        makespan = max(now, 1e-12)
        return SimResult(trace.arrival, trace.prompt, trace.output, self.first_token, self.finish, self.handoff,
                         np.array([p is not None and p[0] == p[1] for p in self.placement]), self.reasons,
                         {i.spec.instance_id: i.busy_time / makespan for i in self.inst},
                         time.perf_counter() - wall0, count, np.array(self.compute), np.array(self.kv_sent))

    # ---- router side
    def _snapshot(self, now: float) -> ClusterSnapshot:
        # Snapshots are immutable: rebuild only the instances that changed since the last decision.
        snaps, dirty = self._snaps, self._dirty
        for k in dirty:
            i = self.inst[k]
            snaps[k] = InstanceSnapshot(
                instance_id=i.spec.instance_id, role=i.spec.role, num_running=len(i.finish_heap),
                num_waiting=len(i.prefill_queue) + len(i.joins) + len(i.kv_wait), outstanding=i.outstanding,
                outstanding_prefill_tokens=i.pending_prefill_tokens, kv_blocks_total=i.kv_blocks_total,
                kv_blocks_free=max(i.kv_free - i.kv_wait_blocks, 0), block_size=self.cfg.block_size, hardware=i.spec.hardware)
        dirty.clear()
        if self.view is not None:
            return ClusterSnapshot(tuple(self._router_view(k, s, now) for k, s in enumerate(snaps)), now)
        return ClusterSnapshot(tuple(snaps), now)

    def _router_view(self, k: int, base: InstanceSnapshot, now: float) -> InstanceSnapshot:
        """The router's figures for instance `k`, its decoding tickets' tokens brought up to date first."""
        inst = self.inst[k]
        done = inst.steps
        if inst.busy and inst.kind == 2:
            done += math.floor((now - inst.start) / inst.step_time + _EPS)
        for _, r in inst.finish_heap:
            self.view.progress(r, max(1 + done - self.join_step[r] - self._extra_step(r), 1), now)
        return self.view.snapshot(base, now)

    def _extra_step(self, r: int) -> int:
        p, d = self.placement[r]
        return int(p != d and self.cfg.overheads.decode_first_step)

    def _info(self, r: int) -> RequestInfo:
        return RequestInfo(str(r), self.prompt[r], self.output[r], float(self.arrival[r]), self.slos[r])

    def _decide(self, r: int, now: float, info: RequestInfo | None = None):
        info = info or self._info(r)
        snapshot = self._snapshot(now)
        if self.cache is not None and self.session[r] >= 0:
            # The request's own prefix hits, per instance: what the live controller's index puts there.
            bs = self.cfg.block_size
            snapshot = ClusterSnapshot(tuple(dataclasses.replace(
                s, prefix_blocks=self.cache.held(k, self.session[r], self.shared[r]) // bs)
                for k, s in enumerate(snapshot.instances)), now)
        return self.policy.decide(info, snapshot)

    def _arrive(self, r: int, now: float) -> None:
        self.admission.append(r)
        if len(self.admission) == 1:
            self._drain_admission(now)

    def _drain_admission(self, now: float) -> None:
        if self.view is not None:
            self._drain_slo(now)
            return
        timeout = self.cfg.admission_timeout_s
        while self.admission:
            r = self.admission[0]
            if now - self.arrival[r] > timeout:
                self.admission.popleft()
                self._reject(r, f"no KV room within the admission timeout ({timeout:g} s)")
                continue
            decision = self._decide(r, now)
            if isinstance(decision, Placement):
                self.admission.popleft()
                self._dispatch(r, decision, now)
            elif not decision.retryable or timeout <= 0:
                self.admission.popleft()
                self._reject(r, decision.reason)
            else:
                return  # FIFO: the head waits for capacity, and so does everyone behind it

    def _drain_slo(self, now: float) -> None:
        """The admission queue in front of an SLO-aware policy (`sim_router`): deadlines, TTFT budgets."""
        view = self.view
        while self.admission:
            r = self.admission[0]
            info = self._info(r)
            if now > view.deadline(info):
                self.admission.popleft()
                self._reject(r, "queue_deadline: no placement met the SLO before the request's deadline")
                continue
            decision = self._decide(r, now, view.retry_info(info, now))
            if isinstance(decision, Placement):
                self.admission.popleft()
                view.placed(r, info, decision, now)
                self._dispatch(r, decision, now)
            elif not view.may_wait(decision):
                self.admission.popleft()
                self._reject(r, decision.reason)
            else:
                if not self._polling:  # the live queue also retries at every stats poll
                    self._polling = True
                    self._push(now + view.poll_s, _POLL, 0)
                return

    def _poll(self, now: float) -> None:
        self._polling = False
        if self.admission:
            self._drain_admission(now)

    def _reject(self, r: int, reason: str) -> None:
        self.reasons[r] = reason

    def _blocks(self, r: int) -> int:
        return -(-(self.prompt[r] + self.output[r]) // self.cfg.block_size)

    def _dispatch(self, r: int, placement: Placement, now: float) -> None:
        p, d = self.index[placement.prefill], self.index[placement.decode]
        self.placement[r] = (p, d)
        dec = self.inst[d]
        dec.outstanding += 1
        self._dirty.add(dec.pos)
        if dec.kv_wait or dec.kv_free < self._blocks(r):
            # placed where KV is short (the policy may queue rather than refuse):
            # the engine holds it until enough blocks free up, FIFO
            dec.kv_wait.append(r)
            dec.kv_wait_blocks += self._blocks(r)
            return
        self._reserve_and_prefill(r, now)

    def _reserve_and_prefill(self, r: int, now: float) -> None:
        p, d = self.placement[r]
        dec, pre = self.inst[d], self.inst[p]
        dec.kv_free -= self._blocks(r)
        if p != d:
            pre.outstanding += 1
        if self.cache is not None:  # vLLM computes at least the prompt's last token
            bs = self.cfg.block_size
            held = self.cache.held(p, self.session[r], self.shared[r]) // bs * bs
            self.compute[r] = self.prompt[r] - min(held, self.prompt[r] - 1)
            if p != d:
                self.kv_sent[r] = self.prompt[r] - self.cache.held(d, self.session[r], self.shared[r]) // bs * bs
        elif p != d:
            self.kv_sent[r] = self.prompt[r]
        pre.pending_prefill_tokens += self.compute[r]  # the router counts it from placement on
        self._dirty.add(pre.pos)
        over = self.cfg.overheads
        if not over.any:
            self._enqueue(r, now)
            return
        at = now + over.dispatch_s
        if p != d:  # the request reaches D, whose scheduler reserves its blocks between two steps
            at = (self._next_boundary(dec, at) if over.reservation_at_step else at) + over.reservation_s
        self._push(at, _ENQUEUE, r)

    def _next_boundary(self, inst: _Instance, t: float) -> float:
        """The first step boundary of `inst` at or after `t` (>= now), as far as its current iteration tells."""
        if not inst.busy or t >= inst.end:
            return t
        if inst.kind == 2:
            steps = math.ceil((t - inst.start) / inst.step_time - _EPS)
            return inst.start + max(steps, 0) * inst.step_time
        return inst.end

    def _enqueue(self, r: int, now: float) -> None:
        if self.view is not None:
            self.view.started(r)
        pre = self.inst[self.placement[r][0]]
        pre.prefill_queue.append(r)
        self._dirty.add(pre.pos)
        self._wake(pre, now)

    # ---- engine side
    def _wake(self, inst: _Instance, now: float) -> None:
        """New work at `inst`: start now if idle, or cut a decode run at its next step boundary."""
        if not inst.busy:
            self._start_iteration(inst, now)
        elif inst.kind == 2:
            done = (now - inst.start) / inst.step_time
            steps = math.floor(done + _EPS)
            if done - steps > _EPS:
                steps += 1  # mid-step: the step in flight completes first
            if steps < inst.planned_steps:
                inst.planned_steps = steps
                inst.end = inst.start + steps * inst.step_time
                inst.version += 1
                self._push(inst.start + steps * inst.step_time, _ITER_END, inst.pos,
                           inst.version)

    def _start_iteration(self, inst: _Instance, now: float) -> None:
        cap = self.cfg.max_batch_size
        while inst.joins and len(inst.finish_heap) < cap:
            self._join(inst, inst.joins.popleft(), now)
        self._dirty.add(inst.pos)
        running = len(inst.finish_heap)
        if inst.prefill_queue and (not self.cfg.chunked_prefill or running < self.cfg.max_prefill_tokens):
            tokens = self._take_prefill(inst, running, now)
            duration = inst.spec.perf.prefill_time(tokens + running)
            if self.cfg.overheads.prefill_request_s:
                duration += self.cfg.overheads.prefill_request_s * self._finishing(inst)
            inst.kind, inst.batch_tokens, inst.rides_along = 1, tokens, running > 0
            if self.view is not None:  # the batch riding along sees the prefill as one long gap
                self.view.gaps(inst.spec.instance_id, running, inst.ctx_base + running * inst.steps, duration, running)
        elif running:
            ctx = inst.ctx_base + running * inst.steps
            inst.step_time = inst.spec.perf.decode_step_time(running, ctx)
            inst.planned_steps = inst.finish_heap[0][0] - inst.steps
            inst.kind = 2
            duration = inst.planned_steps * inst.step_time
            if self.view is not None:
                self.view.gaps(inst.spec.instance_id, running, ctx, inst.step_time, running * inst.planned_steps)
        else:
            inst.busy = False
            return
        inst.busy, inst.start, inst.end = True, now, now + duration
        inst.version += 1
        self._push(now + duration, _ITER_END, inst.pos, inst.version)

    def _finishing(self, inst: _Instance) -> int:
        """Prompts whose prefill the iteration being started completes."""
        if inst.takes is None:
            return len(inst.batch)
        return sum(self.done[r] + t >= self.compute[r] for r, t in zip(inst.batch, inst.takes))

    def _take_prefill(self, inst: _Instance, running: int, now: float) -> int:
        """The prompts (chunked: the chunks) of the prefill iteration starting now; returns its tokens."""
        queue, compute, limit = inst.prefill_queue, self.compute, self.cfg.max_prefill_tokens
        batch, tokens = [], 0
        if not self.cfg.chunked_prefill:
            while queue and (not batch or tokens + compute[queue[0]] <= limit):
                r = queue.popleft()
                batch.append(r)
                tokens += compute[r]
            inst.batch, inst.takes = batch, None
            return tokens
        # vLLM V1: the running decodes took one token each of the step's budget; prompts fill the rest
        # in queue order, the last one cut where the budget ends (it stays at the queue's head)
        budget, takes = limit - running, []
        for r in queue:
            if budget <= 0:
                break
            take = min(compute[r] - self.done[r], budget)
            if not self.done[r]:
                self.prefill_start[r] = now
            batch.append(r)
            takes.append(take)
            tokens += take
            budget -= take
        inst.batch, inst.takes = batch, takes
        return tokens

    def _join(self, inst: _Instance, r: int, now: float) -> None:
        self.join_step[r] = inst.steps
        inst.ctx_base += self.prompt[r] + 1 - inst.steps
        # handed off: D's first step only recomputes the prompt's last token and re-samples P's token
        extra = self._extra_step(r)
        heapq.heappush(inst.finish_heap, (inst.steps + self.output[r] - 1 + extra, r))
        if self.view is not None and self.placement[r][0] != self.placement[r][1]:
            # the live router's first gap: P's token to D's first new one, after D's first step(s)
            step = inst.spec.perf.decode_step_time(len(inst.finish_heap), inst.ctx_base + len(inst.finish_heap)
                                                   * inst.steps)
            self.view.first_gap(r, now + (1 + extra) * step - self.first_token[r])

    def _iteration_end(self, inst: _Instance, version: int, now: float) -> None:
        if version != inst.version:
            return  # superseded: the run was cut short
        inst.busy_time += now - inst.start
        self._dirty.add(inst.pos)
        if inst.kind == 1:
            if inst.rides_along:
                inst.steps += 1
            self._finish_decoders(inst, now)
            if inst.takes is None:
                for r in inst.batch:
                    inst.pending_prefill_tokens -= self.compute[r]
                    self._prefilled(inst, r, now, inst.start)
            else:
                for r, take in zip(inst.batch, inst.takes):
                    self.done[r] += take
                    inst.pending_prefill_tokens -= take
                    if self.done[r] >= self.compute[r]:
                        inst.prefill_queue.popleft()  # the finished prompts lead the queue
                        self._prefilled(inst, r, now, self.prefill_start[r])
            inst.batch = []
        else:
            inst.steps += inst.planned_steps
            self._finish_decoders(inst, now)
        inst.busy = False
        prefilled = inst.kind == 1
        self._start_iteration(inst, now)
        if prefilled and self.view is not None and self.admission:
            self._drain_admission(now)  # a prefill ended: the load changed

    def _prefilled(self, inst: _Instance, r: int, now: float, started: float) -> None:
        self.first_token[r] = now
        self._dirty.add(inst.pos)
        if self.view is not None:
            self.view.first_token(r, now)
        p, d = self.placement[r]
        if self.cache is not None:  # both now hold the prompt (D once the KV lands; close enough)
            for k in {p, d}:
                self.cache.store(k, self.session[r], self.prompt[r])
        if self.output[r] <= 1:
            self._finish(r, now)
            return
        if p == d:
            inst.joins.append(r)  # colocated: joins at the iteration that starts now
            return
        inst.outstanding -= 1  # the prefill instance's part is done
        link, kv = self.cfg.link, self.kv_sent[r] * self.cfg.kv_bytes_per_token
        if not link.shared:
            delay = link.handoff_time(kv, now - started)
            self.handoff[r] = delay
            self._push(now + delay, _KV_READY, r, d)
            return
        # what layer-wise sending got through during the prefill, this prompt's share of the link
        share = min(self.compute[r] / inst.batch_tokens, 1.0)
        sent = min(kv * link.overlap, self.links.bandwidth * (now - started) * share)
        if kv - sent <= 0:
            self.handoff[r] = link.latency_s
            self._push(now + link.latency_s, _KV_READY, r, d)
            return
        self.links.add(now, r, p, d, kv - sent)
        self._schedule_links()

    def _schedule_links(self) -> None:
        t = self.links.next_finish()
        if t is not None:
            self._push(t, _LINK, self.links.version)

    def _link_done(self, now: float) -> None:
        latency = self.cfg.link.latency_s
        for r in self.links.pop_finished(now):
            self.handoff[r] = now + latency - self.first_token[r]
            self._push(now + latency, _KV_READY, r, self.placement[r][1])
        self._schedule_links()

    def _kv_ready(self, r: int, d: int, now: float) -> None:
        inst = self.inst[d]
        inst.joins.append(r)
        self._dirty.add(inst.pos)
        self._wake(inst, now)

    def _finish_decoders(self, inst: _Instance, now: float) -> None:
        heap = inst.finish_heap
        while heap and heap[0][0] <= inst.steps:
            _, r = heapq.heappop(heap)
            inst.ctx_base -= self.prompt[r] + 1 - self.join_step[r]
            self._finish(r, now)

    def _finish(self, r: int, now: float) -> None:
        self.finish[r] = now
        if self.view is not None:
            self.view.finished(r)
        p, d = self.placement[r]
        dec = self.inst[d]
        dec.kv_free += self._blocks(r)
        dec.outstanding -= 1
        if self.output[r] <= 1 and p != d:
            self.inst[p].outstanding -= 1
            self._dirty.add(p)
        self._dirty.add(dec.pos)
        while dec.kv_wait and self._blocks(dec.kv_wait[0]) <= dec.kv_free:
            waiter = dec.kv_wait.popleft()
            dec.kv_wait_blocks -= self._blocks(waiter)
            self._reserve_and_prefill(waiter, now)
        if self.admission:
            self._drain_admission(now)
