"""Orchestrates a benchmark run: prompts, preflight, unloaded probes, load, results.

The clock starts after every open-loop prompt is built, so tokenization never
delays a send. Each request runs as its own task; the run's duration is from
the first send until the last request finishes (or times out), as in vLLM.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pdserve.loadgen import client as http
from pdserve.loadgen import metrics, workload
from pdserve.loadgen.config import BenchConfig
from pdserve.loadgen.errors import TargetUnavailableError
from pdserve.loadgen.prompts import PromptBuilder
from pdserve.loadgen.traces import Trace

_PREFLIGHT_TOKENS = (16, 2)


@dataclass
class RunResult:
    config: BenchConfig
    records: list[http.RequestRecord]
    duration_s: float
    summary: dict[str, Any]
    slo: metrics.SloThresholds | None
    unloaded: metrics.SloThresholds | None
    planned: int
    clipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Progress:
    """A tqdm bar with the count of failures so far in its postfix."""

    total: int | None
    label: str
    enabled: bool

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.failed = 0
        self.bar = tqdm(total=self.total, desc=self.label, unit="req", disable=not self.enabled, leave=True)

    def done(self, record: http.RequestRecord) -> None:
        self.failed += not record.success
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _spec(builder: PromptBuilder, p: workload.PlannedRequest) -> http.RequestSpec:
    return http.RequestSpec(index=p.index, prompt=builder.build(p.index, p.input_tokens),
                            max_tokens=p.output_tokens, scheduled_s=p.send_at_s)


async def _open_loop(conn, config: BenchConfig, specs: list[http.RequestSpec],
                     progress: _Progress) -> tuple[list[http.RequestRecord], float]:
    start = time.perf_counter()
    tasks: list[asyncio.Task] = []
    for spec in specs:
        delay = start + (spec.scheduled_s or 0.0) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(http.send(conn, config.target, spec, start))
        task.add_done_callback(lambda t: progress.done(t.result()))
        tasks.append(task)
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - start


async def _closed_loop(conn, config: BenchConfig, builder: PromptBuilder, plan: Iterator[workload.PlannedRequest],
                       limit: int | None, progress: _Progress) -> tuple[list[http.RequestRecord], float]:
    assert config.arrivals.concurrency is not None
    duration = config.stop.duration_s
    planned = itertools.islice(plan, limit) if limit is not None else plan
    records: list[http.RequestRecord] = []
    start = time.perf_counter()

    async def user() -> None:
        # Each simulated user sends its next request as soon as the previous one ends.
        for p in planned:
            if duration is not None and time.perf_counter() - start >= duration:
                return
            record = await http.send(conn, config.target, _spec(builder, p), start)
            records.append(record)
            progress.done(record)

    await asyncio.gather(*(user() for _ in range(config.arrivals.concurrency)))
    return sorted(records, key=lambda r: r.index), time.perf_counter() - start


async def _sequential(conn, config: BenchConfig, builder: PromptBuilder, n_in: int, n_out: int,
                      count: int) -> list[http.RequestRecord]:
    """Requests sent one at a time (nothing else in flight): preflight and unloaded probes."""
    out = []
    for i in range(count):
        spec = http.RequestSpec(index=-1 - i, prompt=builder.build(10**9 + i, n_in), max_tokens=n_out,
                                scheduled_s=None)
        out.append(await http.send(conn, config.target, spec, time.perf_counter()))
    return out


async def _preflight(conn, config: BenchConfig, builder: PromptBuilder) -> None:
    (record,) = await _sequential(conn, config, builder, *_PREFLIGHT_TOKENS, count=1)
    if not record.success:
        raise TargetUnavailableError(f"the preflight request to {config.target.url} failed: {record.error} "
                                     "(is the server up, the model name right, the endpoint supported?)")


def fill_output_tokens(records: list[http.RequestRecord], tokenizer: Any) -> None:
    """Count output tokens with the tokenizer where the server sent no usage (as vLLM does)."""
    for r in records:
        if r.success and not r.usage_reported:
            r.output_tokens = len(tokenizer(r.generated_text, add_special_tokens=False)["input_ids"])


async def measure_unloaded(config: BenchConfig, builder: PromptBuilder, trace: Trace | None) -> metrics.SloThresholds:
    n_in, n_out = workload.probe_lengths(config, trace)
    async with http.make_client(config.target) as conn:
        probes = await _sequential(conn, config, builder, n_in, n_out, config.slo.unloaded_probes)
    fill_output_tokens(probes, builder.tokenizer)
    failed = [p for p in probes if not p.success]
    if failed:
        raise TargetUnavailableError(f"an unloaded-latency probe failed: {failed[0].error}")
    return metrics.unloaded_latency(probes)


def resolve_slos(config: BenchConfig, unloaded: metrics.SloThresholds | None) -> metrics.SloThresholds | None:
    s = config.slo
    if not s.any:
        return None
    ms = metrics.SloThresholds(*(v / 1000.0 if v is not None else None for v in (s.ttft_ms, s.tpot_ms, s.e2el_ms)))
    return metrics.scaled_slos(ms, {"ttft": s.ttft_x, "tpot": s.tpot_x, "e2el": s.e2el_x}, unloaded)


def slo_headers(slo: metrics.SloThresholds) -> dict[str, str]:
    """The SLOs as pdserve's per-request headers (milliseconds)."""
    out = {}
    if slo.ttft_s is not None:
        out["x-slo-ttft-ms"] = f"{slo.ttft_s * 1000.0:.3f}"
    if slo.tpot_s is not None and slo.tpot_s > 0:
        out["x-slo-tpot-ms"] = f"{slo.tpot_s * 1000.0:.3f}"
    return out


async def _load(config: BenchConfig, builder: PromptBuilder, trace: Trace | None,
                progress_label: str) -> tuple[list[http.RequestRecord], float, int, int]:
    async with http.make_client(config.target) as conn:
        if config.preflight:
            await _preflight(conn, config, builder)
        if config.arrivals.kind == "closed":
            limit = config.stop.num_requests
            if limit is None and config.stop.duration_s is None and trace is not None:
                limit = len(trace)  # a closed-loop trace replay sends each row once
            progress = _Progress(limit, progress_label, config.progress)
            records, duration = await _closed_loop(conn, config, builder,
                                                   workload.closed_loop_lengths(config, trace), limit, progress)
            planned, clipped = len(records), 0
        else:
            plan = workload.plan_open_loop(config, trace)
            specs = [_spec(builder, p) for p in plan]
            progress = _Progress(len(specs), progress_label, config.progress)
            records, duration = await _open_loop(conn, config, specs, progress)
            planned, clipped = len(plan), sum(p.clipped for p in plan)
        progress.close()
    return records, duration, planned, clipped


def run_once(config: BenchConfig, builder: PromptBuilder, trace: Trace | None,
             unloaded: metrics.SloThresholds | None) -> RunResult:
    label = config.label or "bench"
    slo = resolve_slos(config, unloaded)
    if config.slo.send and slo is not None:
        config = config.model_copy(update={"target": config.target.model_copy(
            update={"headers": {**config.target.headers, **slo_headers(slo)}})})
    records, duration, planned, clipped = asyncio.run(_load(config, builder, trace, label))
    if not records:
        raise TargetUnavailableError("no request was sent: the duration or request count is too small "
                                     "for the arrival rate")
    fill_output_tokens(records, builder.tokenizer)
    summary = metrics.summarize(records, duration, config.percentiles, slo)
    lags = [r.start_s - r.scheduled_s for r in records if r.scheduled_s is not None]
    extra = {"max_send_lag_ms": max(lags) * 1000.0 if lags else None}
    return RunResult(config=config, records=records, duration_s=duration, summary=summary, slo=slo,
                     unloaded=unloaded, planned=planned, clipped=clipped, extra=extra)


def _write(result: RunResult, directory, console) -> dict[str, Any]:
    from pdserve.loadgen import charts, report

    data = report.write_run(result, directory)
    if result.config.charts:
        samples_ms = {k: [v * 1000.0 for v in vs] for k, vs in metrics.samples(result.records).items()}
        charts.latency_cdfs([(result.config.label or "run", samples_ms)], data["slo_ms"],
                            directory / "latency_cdf.png")
    report.print_summary(data, console)
    return data


def _rate_label(rate: float) -> str:
    return f"{rate:g}".replace(".", "p")


def execute(config: BenchConfig, console=None) -> list[dict[str, Any]]:
    """Run the benchmark (or the sweep) and write every output; returns the result dicts."""
    from pdserve.loadgen import charts, report, traces
    from pdserve.loadgen.prompts import load_tokenizer

    w = config.workload
    trace = None
    if w.trace is not None:
        trace = workload.trace_window(traces.load(w.trace, w.trace_dir), w.trace_start_s)
    builder = PromptBuilder(load_tokenizer(w.tokenizer), chat=config.target.is_chat, seed=w.seed,
                            prefix_fraction=w.shared_prefix_fraction, prefix_len=w.shared_prefix_len,
                            prefix_groups=w.shared_prefix_groups)
    # Measured once, before any load, so that every rate of a sweep is judged by the same SLOs.
    unloaded = asyncio.run(measure_unloaded(config, builder, trace)) if config.slo.needs_unloaded else None
    if not config.sweep_rates:
        return [_write(run_once(config, builder, trace, unloaded), config.output_dir, console)]
    results, points = [], []
    for rate in config.sweep_rates:
        label = f"{config.label or 'sweep'} @ {rate:g} req/s"
        sub_dir = config.output_dir / f"rate_{_rate_label(rate)}"
        cfg = config.model_copy(update={"arrivals": config.arrivals.model_copy(update={"rate": rate}),
                                        "label": label, "output_dir": sub_dir})
        data = _write(run_once(cfg, builder, trace, unloaded), sub_dir, console)
        results.append(data)
        points.append(report.sweep_point(data, sub_dir.name))
    report.write_sweep(points, config.output_dir)
    if config.charts:
        series = [(config.label or "sweep", points)]
        charts.sweep_throughput(series, config.output_dir / "sweep_throughput.png")
        charts.sweep_attainment(series, config.output_dir / "sweep_slo_attainment.png")
    report.print_sweep(points, console)
    return results
