"""The live router's bookkeeping inside the simulator, for policies that read it (`slo_aware`).

The live controller keeps a `Ledger` of tickets (`router/accounting.py`), builds every
snapshot's outstanding/prefill/context/decoding/rate figures from it, feeds the policy's
`LatencyModel` what it observes (`controller.tokens`, `_observe`) and holds refused requests
in its admission queue (`router/admission.py`). With a policy that has a `LatencyModel`, the
simulator does the same, with the same classes, at the same moments of the simulated run:

- a placement opens a `Ticket` (placed at the decision, with the request's SLO); the prompt
  entering its engine starts it; the first token is `Ledger.tokens(ticket, 1, t)`;
- before every decision each decoding ticket's token count is brought up to the steps its
  instance has completed (the live one counts deltas as they stream);
- every simulated decode run, and every prefill step a decode batch rides along in, is what
  the live router sees as gaps between deltas: `observe_gap(instance, batch, context, step)`,
  once per request and step (at most `GAP_OBSERVATIONS` a run: identical gaps teach nothing more);
- a finished request: `observe_finished(placement, ttft, first gap)` and the ticket closes;
- admission: a refusal whose reason capacity cures (`QUEUEABLE`) waits until its deadline,
  min(its class's queue timeout, its TTFT target), and is retried with what is left of its
  TTFT budget whenever the load changes (a prefill ends, a request finishes) and at every
  stats poll (`poll_s`); any other refusal is final at once.
Not modelled: the admission queue's per-class bound and its early refusal from the policy's
slot forecast (both refuse requests that would miss their TTFT anyway: goodput is the same),
stats up to one poll old (the simulator's engine figures are exact).
"""

from __future__ import annotations

import dataclasses

from pdserve.router.accounting import Ledger, Ticket
from pdserve.router.latency_model import LatencyModel
from pdserve.router.snapshot import InstanceSnapshot, Placement, Rejection, RequestInfo
from pdserve.shared.slo import QUEUEABLE, RequestSlo

GAP_OBSERVATIONS = 50
_MIN_BUDGET_S = 1e-3


def model_of(policy) -> LatencyModel | None:
    model = getattr(policy, "model", None)
    return model if isinstance(model, LatencyModel) else None


class RouterView:
    """Tickets, observations and admission deadlines of one simulated run (see the module docstring)."""

    def __init__(self, policy, instance_ids: list[str], poll_s: float = 0.5) -> None:
        self.model = model_of(policy)
        self.config = getattr(policy, "config", None)
        self.poll_s = poll_s
        self.ledger = Ledger()
        for iid in instance_ids:
            self.ledger.add_instance(iid)
        self.tickets: dict[int, Ticket] = {}

    # -- admission ---------------------------------------------------------------------------
    def slo(self, request: RequestInfo) -> RequestSlo | None:
        if request.slo is not None or self.config is None:
            return request.slo
        return self.config.resolve()

    def deadline(self, request: RequestInfo) -> float:
        slo = self.slo(request)
        if slo is None or self.config is None:
            return float("inf")
        _, timeout = self.config.queue_limit(slo.priority)
        return request.arrival_time + min(timeout, slo.ttft_s)

    @staticmethod
    def may_wait(rejection: Rejection) -> bool:
        return rejection.retryable and (rejection.code is None or rejection.code in QUEUEABLE)

    def retry_info(self, request: RequestInfo, now: float) -> RequestInfo:
        """The request as retried after waiting: its TTFT budget less the wait (the admission queue's)."""
        slo = self.slo(request)
        waited = now - request.arrival_time
        if slo is None or waited <= 0:
            return request
        return dataclasses.replace(request, slo=dataclasses.replace(slo, ttft_s=max(slo.ttft_s - waited,
                                                                                    _MIN_BUDGET_S)))

    # -- the ledger ----------------------------------------------------------------------------
    def placed(self, r: int, request: RequestInfo, placement: Placement, now: float) -> None:
        self.tickets[r] = self.ledger.open(Ticket(request.request_id, placement.prefill, placement.decode,
                                                  request.prompt_tokens, request.max_tokens, now, placement,
                                                  self.slo(request)))

    def started(self, r: int) -> None:
        self.ledger.start(self.tickets[r])

    def first_token(self, r: int, now: float) -> None:
        self.ledger.tokens(self.tickets[r], 1, now)

    def progress(self, r: int, tokens: int, now: float) -> None:
        """Bring a decoding ticket's count up to `tokens` streamed (the snapshot's per-request view)."""
        ticket = self.tickets[r]
        if tokens > ticket.tokens:
            ticket.tokens, ticket.last_token_at = tokens, now

    def first_gap(self, r: int, gap_s: float) -> None:
        self.tickets[r].first_gap_s = gap_s

    def finished(self, r: int) -> None:
        ticket = self.tickets.pop(r)
        self.ledger.close(ticket)
        if self.model is not None and isinstance(ticket.placement, Placement):
            self.model.observe_finished(ticket.placement, ticket.ttft_s, ticket.first_gap_s)

    def gaps(self, instance_id: str, batch: int, context: float, step_s: float, count: int) -> None:
        if self.model is None or batch <= 0:
            return
        for _ in range(min(count, GAP_OBSERVATIONS)):
            self.model.observe_gap(instance_id, batch, context, step_s)

    def snapshot(self, base: InstanceSnapshot, now: float) -> InstanceSnapshot:
        """`base` (the engine's figures) with the router's own counts, as the controller builds it."""
        load = self.ledger.load(base.instance_id, now)
        return dataclasses.replace(base, outstanding=load.outstanding, outstanding_prefill_tokens=load.prefill_tokens,
                                   outstanding_context_tokens=load.context_tokens, decoding=load.decoding,
                                   decode_rate=load.decode_rate, prefill_token_rate=load.prefill_token_rate)
