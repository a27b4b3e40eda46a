"""Prometheus metrics, named in vLLM's style with a `pdserve:` prefix.

One `Metrics` object per gateway, with its own registry (no module-global
collectors), so tests can build as many gateways as they like.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve.shared.lifecycle import Outcome, RequestLifecycle
from pdserve.shared.protocol import EngineStats
from pdserve.shared.roles import Role

# Latency buckets (seconds): from sub-millisecond GPU steps to slow CPU prompts.
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
            2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
         0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    """Request-level histograms and per-instance gauges."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        self.requests = Counter("pdserve:requests", "Requests by outcome.", ["model_name", "outcome"], registry=r)
        self.finished = Counter("pdserve:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated.", ["model_name"], registry=r)
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token.",
                              ["model_name"], buckets=_LATENCY, registry=r)
        self.tpot = Histogram("pdserve:time_per_output_token_seconds", "Mean time per output token of a request.",
                              ["model_name"], buckets=_STEP, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between consecutive token deliveries.",
                             ["model_name"], buckets=_STEP, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Arrival to finish.",
                             ["model_name"], buckets=_LATENCY, registry=r)
        self.queue = Histogram("pdserve:request_queue_time_seconds", "Time waiting in the engine before scheduling.",
                               ["model_name"], buckets=_LATENCY, registry=r)
        self.handoff = Histogram("pdserve:kv_handoff_seconds", "Disaggregated requests: prefill's first token to "
                                 "decode's first step (KV handoff plus scheduling), as the gateway sees it.",
                                 ["model_name"], buckets=_LATENCY, registry=r)
        labels = ["model_name", "instance", "role"]
        self.running = Gauge("pdserve:num_requests_running", "Requests in the engine's running batch.", labels, registry=r)
        self.waiting = Gauge("pdserve:num_requests_waiting", "Requests queued in the engine.", labels, registry=r)
        self.kv_usage = Gauge("pdserve:kv_cache_usage_perc", "KV-cache usage, 0 to 1.", labels, registry=r)
        self.healthy = Gauge("pdserve:instance_healthy", "1 if the instance answers, else 0.", labels, registry=r)
        self.kv_transfers = Gauge("pdserve:kv_transfers", "KV handoffs seen by an instance's connector since start, "
                                  "by event (recv_done, recv_failed = recomputes, send_done, send_failed, ...).",
                                  labels + ["event"], registry=r)
        self.kv_seconds = Gauge("pdserve:kv_transfer_seconds", "Seconds of KV handoff since start on a prefill "
                                "instance: `transfer` (first layer sent to last acknowledged) and `exposed` "
                                "(the part after the prompt's compute ended, not overlapped).",
                                labels + ["kind"], registry=r)
        self.kv_bytes = Gauge("pdserve:kv_transfer_bytes", "KV-cache bytes an instance has sent since start.",
                              labels, registry=r)
        self.orphans = Counter("pdserve:engine_orphans_aborted", "Engine-core requests the engine's front end "
                               "had forgotten (no one reads or aborts them), found by the worker and aborted.",
                               labels, registry=r)
        self.restarts = Counter("pdserve:engine_restarts", "Engines the controller restarted after they died.",
                                labels, registry=r)
        self.prefix_queries = Counter(
            "pdserve:prefix_cache_queries", "Prompt tokens looked up in a prefix cache, by the role of the instance "
            "that computed the prompt (prefill under disaggregation).", ["model_name", "role"], registry=r)
        self.prefix_hits = Counter(
            "pdserve:prefix_cache_hits", "Prompt tokens found in that instance's prefix cache (reused, not "
            "computed); queries - hits were computed.", ["model_name", "role"], registry=r)
        self.kv_bytes_saved = Counter(
            "pdserve:kv_transfer_bytes_saved", "KV-cache bytes a prefill instance did not send because the decode "
            "instance held those prompt blocks already.", labels, registry=r)
        self.kv_blocks_saved = Counter(
            "pdserve:kv_transfer_blocks_saved", "Prompt blocks not sent because the decode instance held them.",
            labels, registry=r)
        self.prefix_index = Gauge("pdserve:prefix_index", "The router's prefix index since start: events applied, "
                                  "stale and out-of-order events, sequence gaps, replays, hash checks.",
                                  ["model_name", "counter"], registry=r)
        self.prefix_predicted = Gauge(
            "pdserve:prefix_index_hit_tokens", "Prompt tokens the prefix index said the chosen instance held, "
            "and prompt tokens placed (kind=placed), by role, since start.", ["model_name", "role", "kind"],
            registry=r)
        self._saved_seen: dict[tuple[str, str], float] = {}  # (instance, event) -> last total seen
        self.handoffs = Gauge("pdserve:handoffs", "Requests routed P->D since start, by outcome (handoffs, "
                              "fallbacks_colocated, decode_alone, prefill_failures, first_token_restarts).",
                              ["model_name", "outcome"], registry=r)
        self.recoveries = Counter(
            "pdserve:stream_recoveries", "Streams whose instance failed mid-request, by outcome: resumed (a "
            "continuation on another instance gave its first token), completed (a resumed stream finished), "
            "timeout (a continuation stayed silent), no_instance and limit (the stream ended with an error).",
            ["model_name", "outcome"], registry=r)
        self._recoveries_seen: dict[str, int] = {}
        self.scaling = Gauge("pdserve:scaling_events", "Instances the scaler started, failed to start (placement "
                             "or load past pools.start_timeout_s), removed, and drains that reached their deadline "
                             "with requests still running, since start.", ["model_name", "event"], registry=r)

        self._add_migration_metrics(r)

    def _add_migration_metrics(self, r: CollectorRegistry) -> None:
        """Live migration (issue 11). Bytes moved: pdserve:kv_transfers{event="migrate_bytes"} per source."""
        m = ["model_name"]
        self.migrations = Counter("pdserve:migrations", "Live migrations of decoding requests, by reason (drain, "
                                  "preemption, priority, load_balance) and outcome (completed, rejected = nothing "
                                  "done, aborted = started and called off; the request went on).",
                                  m + ["reason", "outcome"], registry=r)
        self.migration_downtime = Histogram("pdserve:migration_downtime_seconds", "Completed migrations: the "
                                            "source's stop to the target's first token in the client's stream.",
                                            m, buckets=_LATENCY, registry=r)
        self.migration_stages = Histogram("pdserve:migration_stages", "Copy rounds per completed migration "
                                          "(1: stop-and-copy).", m, buckets=(1, 2, 3, 4, 6, 8, 12), registry=r)
        self.migration_blocks = Histogram("pdserve:migration_blocks", "KV blocks sent per completed migration.",
                                          m, buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 4096), registry=r)
        self.migration_aborts = Counter("pdserve:migration_aborts", "Migrations called off after they started, "
                                        "by the stage they reached (switch, reserve, send, resume).",
                                        m + ["stage"], registry=r)

    def observe_migration(self, result: Any) -> None:
        """One `router.migration.MigrationResult` (typed loosely: shared/ does not import the router)."""
        m = self.model_name
        self.migrations.labels(m, result.reason.value, result.outcome.value).inc()
        if result.outcome.value == "aborted":
            self.migration_aborts.labels(m, result.stage.value).inc()
        elif result.outcome.value == "completed":
            if result.downtime_s is not None:
                self.migration_downtime.labels(m).observe(result.downtime_s)
            self.migration_stages.labels(m).observe(result.stages)
            self.migration_blocks.labels(m).observe(result.blocks)

    def observe_request(self, life: RequestLifecycle, finish_reasons: list[str]) -> None:
        """Record a finished request (any outcome)."""
        m = self.model_name
        outcome = (life.outcome or Outcome.ERROR).value
        self.requests.labels(m, outcome).inc()
        for reason in finish_reasons:
            self.finished.labels(m, reason).inc()
        if life.outcome is Outcome.REJECTED:
            return
        self.prompt_tokens.labels(m).inc(life.num_prompt_tokens)
        self.generation_tokens.labels(m).inc(life.num_output_tokens)
        for value, hist in ((life.ttft, self.ttft), (life.tpot, self.tpot), (life.e2e, self.e2e),
                            (life.queue_time_s, self.queue), (life.handoff_s, self.handoff)):
            if value is not None:
                hist.labels(m).observe(value)
        for gap in life.inter_token:
            self.itl.labels(m).observe(gap)

    def observe_instance(self, stats: EngineStats) -> None:
        labels = (self.model_name, stats.instance_id, stats.role.value)
        self.running.labels(*labels).set(stats.num_running)
        self.waiting.labels(*labels).set(stats.num_waiting)
        self.kv_usage.labels(*labels).set(stats.kv_usage)
        self.healthy.labels(*labels).set(1 if stats.healthy else 0)
        self._count_total(stats.instance_id, "orphans_aborted", stats.orphans_aborted, self.orphans.labels(*labels))
        for event, value in stats.kv_transfer.items():
            if event in ("bytes_saved", "blocks_saved"):
                self._count_total(stats.instance_id, event, value,
                                  (self.kv_bytes_saved if event == "bytes_saved" else self.kv_blocks_saved)
                                  .labels(*labels))
            elif event == "bytes_sent":
                self.kv_bytes.labels(*labels).set(value)
            elif event.endswith("_s"):
                self.kv_seconds.labels(*labels, event.removesuffix("_s")).set(value)
            else:
                self.kv_transfers.labels(*labels, event).set(value)

    def _count_total(self, instance: str, event: str, total: float, counter) -> None:
        """A counter from an instance's running total (stats report totals since start)."""
        last = self._saved_seen.get((instance, event), 0.0)
        if total > last:
            counter.inc(total - last)
        self._saved_seen[(instance, event)] = max(total, last)

    def observe_prefix(self, role: Role, prompt_tokens: int, cached_tokens: int) -> None:
        """One prompt computed by an instance of `role`: how much of it its prefix cache held."""
        self.prefix_queries.labels(self.model_name, role.value).inc(prompt_tokens)
        self.prefix_hits.labels(self.model_name, role.value).inc(cached_tokens)

    def observe_prefix_index(self, counters: dict[str, int], placed: dict[str, int], hits: dict[str, int]) -> None:
        for name, value in counters.items():
            self.prefix_index.labels(self.model_name, name).set(value)
        for role, value in placed.items():
            self.prefix_predicted.labels(self.model_name, role, "placed").set(value)
            self.prefix_predicted.labels(self.model_name, role, "hit").set(hits.get(role, 0))

    def observe_restart(self, stats: EngineStats) -> None:
        self.restarts.labels(self.model_name, stats.instance_id, stats.role.value).inc()

    def observe_handoffs(self, counters: dict[str, int]) -> None:
        for outcome, value in counters.items():
            self.handoffs.labels(self.model_name, outcome).set(value)

    def observe_recoveries(self, counters: dict[str, int]) -> None:
        """The router's recovery counts since start (`router.recovery.counters`), as counter increments."""
        for outcome, total in counters.items():
            seen = self._recoveries_seen.get(outcome, 0)
            if total > seen:
                self.recoveries.labels(self.model_name, outcome).inc(total - seen)
                self._recoveries_seen[outcome] = total

    def observe_scaling(self, counters: dict[str, int]) -> None:
        for event, value in counters.items():
            self.scaling.labels(self.model_name, event).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
