"""Prometheus metrics of SLOs, placement and admission (`pdserve:` names, like `shared.metrics`).

Fed by three parties: the gateway (a finished request against its SLO, client-side times from
arrival, admission wait included), the router (every policy decision; every finished placement's
predicted against actual TTFT and TPOT, both from the placement on) and the admission queue
(admitted, refused, queue depths). Shares the gateway's registry; duck-typed inputs, so that
`shared/` imports nothing of the router's.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.shared.lifecycle import Outcome, RequestLifecycle
from pdserve.shared.slo import DecisionReason, Priority, RequestSlo

# actual / predicted: 1 is a perfect prediction
# Edges at 1 / (1 +- e) for e = 10, 20, 30, 50 %: actual / predicted within a pair of them means
# |predicted / actual - 1| <= e, so the histogram reads as the predictor's error distribution.
_RATIO = (0.1, 0.25, 0.5, 0.6667, 0.7692, 0.8333, 0.9091, 1.0, 1.1111, 1.25, 1.4286, 2.0, 4.0, 10.0)
_WAIT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class SloMetrics:
    """SLO attainment per class, prediction ratios, decisions, rejections, admission queues."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 prediction_log: str | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # one JSON line per finished placement (benchmarks read the predictor's error from it)
        self._log: TextIO | None = open(prediction_log, "a", buffering=1) if prediction_log else None
        self.model_name = model_name
        r = self.registry
        self.slo_requests = Counter(
            "pdserve:slo_requests", "Finished (admitted, successful) requests by priority class and which of their "
            "targets they met (met, ttft_missed, tpot_missed, both_missed); TTFT from arrival at the gateway.",
            ["model_name", "priority", "result"], registry=r)
        self.attainment = Gauge("pdserve:slo_attainment", "Share of finished requests of the class that met both "
                                "their TTFT and TPOT targets, since start.", ["model_name", "priority"], registry=r)
        self.ttft_ratio = Histogram("pdserve:ttft_prediction_ratio", "Actual / predicted TTFT of a placement "
                                    "(both from the placement on).", ["model_name"], buckets=_RATIO, registry=r)
        self.tpot_ratio = Histogram("pdserve:tpot_prediction_ratio", "Actual / predicted TPOT of a placement.",
                                    ["model_name"], buckets=_RATIO, registry=r)
        self.decisions = Counter("pdserve:placement_decisions", "Policy decisions by reason (placed, fallbacks, "
                                 "or why not; retries from the admission queue count too).",
                                 ["model_name", "reason"], registry=r)
        self.rejections = Counter("pdserve:rejections", "Requests refused by admission control (429) by class "
                                  "and reason.", ["model_name", "priority", "reason"], registry=r)
        self.depth = Gauge("pdserve:admission_queue_depth", "Requests waiting in the admission queue.",
                                 ["model_name", "priority"], registry=r)
        self.queue_wait = Histogram("pdserve:admission_queue_wait_seconds", "Time queued requests waited for a "
                                    "placement, by class and how the wait ended (admitted, rejected).",
                                    ["model_name", "priority", "outcome"], buckets=_WAIT, registry=r)
        self._met: dict[Priority, list[int]] = {}  # class -> [met, finished]

    # -- the gateway -------------------------------------------------------------------------------
    def observe_request(self, slo: RequestSlo | None, life: RequestLifecycle) -> None:
        """A finished request against its SLO (only successful ones: errors and aborts are other metrics)."""
        if slo is None or life.outcome is not Outcome.OK:
            return
        ttft_met, tpot_met = slo.met(life.ttft, life.tpot)
        result = "met" if ttft_met and tpot_met else "both_missed" if not (ttft_met or tpot_met) else \
            "ttft_missed" if not ttft_met else "tpot_missed"
        self.slo_requests.labels(self.model_name, slo.priority.value, result).inc()
        met, total = self._met.setdefault(slo.priority, [0, 0])
        self._met[slo.priority] = [met + (result == "met"), total + 1]
        self.attainment.labels(self.model_name, slo.priority.value).set(self._met[slo.priority][0] /
                                                                        self._met[slo.priority][1])

    # -- the router (RouterObserver) ------------------------------------------------------------------
    def decided(self, request: Any, decision: Any) -> None:
        reason = getattr(decision, "code", None) or getattr(decision, "reason", None)
        if not isinstance(reason, DecisionReason):  # the other policies say nothing of why
            reason = "placed" if hasattr(decision, "decode") else (
                "never_fits" if not getattr(decision, "retryable", True) else "no_instance")
        self.decisions.labels(self.model_name, getattr(reason, "value", reason)).inc()

    def finished(self, ticket: Any) -> None:
        placement = ticket.placement
        if placement is None:
            return
        for predicted, actual, hist in ((placement.predicted_ttft_s, ticket.ttft_s, self.ttft_ratio),
                                        (placement.predicted_tpot_s, ticket.tpot_s, self.tpot_ratio)):
            if predicted and actual is not None and predicted > 0:
                hist.labels(self.model_name).observe(actual / predicted)
        if self._log is not None:
            reason = getattr(placement, "reason", None)
            self._log.write(json.dumps({
                "request_id": ticket.request_id, "prefill": placement.prefill, "decode": placement.decode,
                "reason": getattr(reason, "value", reason), "prompt_tokens": ticket.prompt_tokens,
                "max_tokens": ticket.max_tokens, "tokens": ticket.tokens, "placed_at": ticket.placed_at,
                "predicted_ttft_s": placement.predicted_ttft_s, "ttft_s": ticket.ttft_s,
                "predicted_tpot_s": placement.predicted_tpot_s, "tpot_s": ticket.tpot_s,
                "first_gap_s": getattr(ticket, "first_gap_s", None),
                "basis": getattr(placement, "basis", None)}) + "\n")

    # -- the admission queue (AdmissionObserver) -------------------------------------------------------
    def admitted(self, priority: Priority, waited_s: float, queued: bool) -> None:
        if queued:
            self.queue_wait.labels(self.model_name, priority.value, "admitted").observe(waited_s)

    def rejected(self, priority: Priority, reason: DecisionReason, waited_s: float) -> None:
        self.rejections.labels(self.model_name, priority.value, reason.value).inc()
        if waited_s > 0:
            self.queue_wait.labels(self.model_name, priority.value, "rejected").observe(waited_s)

    def queue_depth(self, priority: Priority, depth: int) -> None:
        self.depth.labels(self.model_name, priority.value).set(depth)
