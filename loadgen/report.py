"""Run outputs: the terminal table, result.json, requests.csv, and reading them back.

result.json uses the key names of `vllm bench serve`'s result file for every
metric both tools compute (request_throughput, mean_ttft_ms, p99_tpot_ms,
request_goodput, ...), so one script can read either; pdserve-only facts
(SLOs, unloaded latency, errors by kind, the workload) are added beside them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdserve.loadgen.errors import RunDirectoryError
from pdserve.loadgen.metrics import LATENCY_METRICS, meets_slos, percentile_key, tpot_s

if TYPE_CHECKING:  # the runner writes reports, so a runtime import would be circular
    from pdserve.loadgen.runner import RunResult

RESULT_FILE = "result.json"
REQUESTS_FILE = "requests.csv"
SWEEP_FILE = "sweep.json"
_MAX_ERROR_EXAMPLES = 10
CSV_COLUMNS = ("index", "scheduled_s", "start_s", "prompt_tokens", "max_tokens", "output_tokens", "prefix_group",
               "success", "error_kind", "error", "finish_reason", "met_slo", "ttft_ms", "tpot_ms", "e2el_ms",
               "itl_ms")
_TITLES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
           "itl": "Inter-token latency", "e2el": "End-to-end latency"}


def offered_rate(result: RunResult) -> float | str:
    a = result.config.arrivals
    if a.rate is not None and a.kind != "closed":
        return a.rate
    starts = [r.scheduled_s for r in result.records if r.scheduled_s is not None]
    if len(starts) > 1 and max(starts) > 0:
        return (len(starts) - 1) / max(starts)  # the replayed trace's own mean rate
    return "inf"  # a closed loop, as vLLM writes an unlimited rate


def result_json(result: RunResult) -> dict[str, Any]:
    c = result.config
    errors = [r.error for r in result.records if not r.success]
    out: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if c.target.is_chat else "openai",
        "backend": "openai-chat" if c.target.is_chat else "openai",
        "label": c.label,
        "model_id": c.target.model,
        "tokenizer_id": c.workload.tokenizer,
        "num_prompts": len(result.records),
        "request_rate": offered_rate(result),
        "burstiness": c.arrivals.burstiness if c.arrivals.kind == "gamma" else 1.0,
        "max_concurrency": c.arrivals.concurrency,
    }
    out.update(result.summary)
    out.update({
        "base_url": c.target.base_url,
        "endpoint": c.target.endpoint,
        "arrival": c.arrivals.kind,
        "trace": c.workload.trace,
        "planned_requests": result.planned,
        "clipped_requests": result.clipped,
        "percentiles": c.percentiles,
        "slo_ms": result.slo.as_ms() if result.slo else None,
        "unloaded_latency_ms": result.unloaded.as_ms() if result.unloaded else None,
        "error_examples": sorted(set(errors))[:_MAX_ERROR_EXAMPLES],
        "config": json.loads(c.model_dump_json()),
        **result.extra,
    })
    return out


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1000.0:.3f}"


def csv_row(r, slo) -> dict[str, Any]:
    tpot = tpot_s(r) if r.success else None
    return {
        "index": r.index, "scheduled_s": "" if r.scheduled_s is None else f"{r.scheduled_s:.6f}",
        "start_s": f"{r.start_s:.6f}", "prompt_tokens": r.prompt_tokens, "max_tokens": r.max_tokens,
        "output_tokens": r.output_tokens if r.success else "",
        "prefix_group": "" if r.prefix_group is None else r.prefix_group,
        "success": int(r.success), "error_kind": r.error_kind, "error": r.error,
        "finish_reason": r.finish_reason or "", "met_slo": "" if slo is None else int(meets_slos(r, slo)),
        "ttft_ms": _ms(r.ttft_s) if r.success else "", "tpot_ms": _ms(tpot),
        "e2el_ms": _ms(r.latency_s) if r.success else "",
        "itl_ms": " ".join(f"{g * 1000.0:.3f}" for g in r.itl_s) if r.success else "",
    }


def write_run(result: RunResult, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    data = result_json(result)
    (directory / RESULT_FILE).write_text(json.dumps(data, indent=2) + "\n")
    with (directory / REQUESTS_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in result.records:
            writer.writerow(csv_row(r, result.slo))
    return data


def print_summary(data: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"pdserve bench — {data.get('label') or data['model_id']}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("Successful requests", f"{data['completed']}"), ("Failed requests", f"{data['failed']}"),
            ("Offered request rate (req/s)", _fmt(data["request_rate"])),
            ("Benchmark duration (s)", f"{data['duration']:.2f}"),
            ("Total input tokens", f"{data['total_input_tokens']}"),
            ("Total generated tokens", f"{data['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{data['request_throughput']:.3f}"),
            ("Output token throughput (tok/s)", f"{data['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{data['total_token_throughput']:.2f}"),
            ("Peak output token throughput (tok/s)", f"{data['max_output_tokens_per_s']:.2f}")]
    if data.get("request_goodput") is not None:
        slo = ", ".join(f"{k} ≤ {v:.1f} ms" for k, v in data["slo_ms"].items())
        rows += [("SLOs", slo), ("Request goodput (req/s)", f"{data['request_goodput']:.3f}"),
                 ("SLO attainment", f"{100.0 * data['slo_attainment']:.1f} %")]
        if data.get("slo_attainment_admitted") is not None:
            rows.append(("SLO attainment of admitted", f"{100.0 * data['slo_attainment_admitted']:.1f} %"))
    if data.get("rejected"):
        rows += [("Rejected (429)", str(data["rejected"])),
                 ("Rejection latency p50 / p99 (ms)",
                  f"{data.get('median_rejection_ms', 0.0):.1f} / {data.get('p99_rejection_ms', 0.0):.1f}")]
    for key, count in sorted(data.get("errors_by_kind", {}).items()):
        rows.append((f"Failed: {key}", str(count)))
    for k, v in rows:
        table.add_row(k, v)
    for name in LATENCY_METRICS:
        table.add_section()
        table.add_row(f"[bold]{_TITLES[name]}[/bold]", "")
        # p50 is the median, already shown.
        for stat in ("mean", "median", *(percentile_key(p) for p in data["percentiles"] if p != 50)):
            table.add_row(f"  {stat.capitalize() if stat in ('mean', 'median') else stat.upper()} "
                          f"{name.upper()} (ms)", f"{data[f'{stat}_{name}_ms']:.2f}")
    console.print(table)
    for example in data.get("error_examples", [])[:3]:
        console.print(f"[red]error:[/red] {example}")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


@dataclass
class LoadedRun:
    """A finished run read back from its directory, for charts and comparisons."""

    path: Path
    label: str
    result: dict[str, Any]
    samples_ms: dict[str, list[float]]  # per latency metric, successful requests only


def read_samples(path: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in LATENCY_METRICS}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["success"] != "1":
                continue
            for name in ("ttft", "tpot", "e2el"):
                if row[f"{name}_ms"]:
                    out[name].append(float(row[f"{name}_ms"]))
            out["itl"] += [float(v) for v in row["itl_ms"].split()]
    return out


def load_run(directory: Path) -> LoadedRun:
    result_path = directory / RESULT_FILE
    if not result_path.is_file():
        raise RunDirectoryError(f"{directory} holds no {RESULT_FILE} (is it a `pdserve bench` output dir?)")
    result = json.loads(result_path.read_text())
    csv_path = directory / REQUESTS_FILE
    samples = read_samples(csv_path) if csv_path.is_file() else {n: [] for n in LATENCY_METRICS}
    return LoadedRun(path=directory, label=result.get("label") or directory.name, result=result, samples_ms=samples)


def write_sweep(points: list[dict[str, Any]], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SWEEP_FILE).write_text(json.dumps({"points": points}, indent=2) + "\n")


def load_sweep(directory: Path) -> list[dict[str, Any]] | None:
    path = directory / SWEEP_FILE
    return json.loads(path.read_text())["points"] if path.is_file() else None


def sweep_point(data: dict[str, Any], run_dir: str) -> dict[str, Any]:
    keys = ("request_rate", "request_throughput", "request_goodput", "output_throughput", "slo_attainment",
            "completed", "failed", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "p99_e2el_ms")
    return {"run_dir": run_dir, **{k: data.get(k) for k in keys}}


def _opt(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def print_sweep(points: list[dict[str, Any]], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="pdserve bench — request-rate sweep",
                  caption="rate, served and goodput in req/s; output in tok/s; latencies in ms")
    for col in ("rate", "served", "goodput", "SLO met", "output", "p99 TTFT", "p99 TPOT", "failed"):
        table.add_column(col, justify="right")
    for p in points:
        att = "" if p["slo_attainment"] is None else f"{100 * p['slo_attainment']:.1f} %"
        table.add_row(_fmt(p["request_rate"]), f"{p['request_throughput']:.3f}", _opt(p["request_goodput"], ".3f"),
                      att, f"{p['output_throughput']:.1f}", _opt(p["p99_ttft_ms"], ".1f"),
                      _opt(p["p99_tpot_ms"], ".1f"), str(p["failed"]))
    console.print(table)
