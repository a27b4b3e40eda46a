"""`pdserve bench compare RUN_A RUN_B ...`: several runs on the same charts, with ratios.

Each RUN is an output directory of `pdserve bench`: a single run (result.json,
requests.csv) or a sweep (sweep.json). Ratios are against the first run, so
put the baseline first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.loadgen import charts, report
from pdserve.loadgen.errors import RunDirectoryError

RATIO_KEYS = ("request_throughput", "output_throughput", "request_goodput", "slo_attainment",
              "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
              "mean_e2el_ms", "p99_e2el_ms")
SWEEP_KEYS = ("request_throughput", "request_goodput", "output_throughput")


@dataclass
class Compared:
    label: str
    run: report.LoadedRun | None  # None for a sweep directory
    sweep: list[dict[str, Any]] | None


def load(directory: Path, label: str | None) -> Compared:
    sweep = report.load_sweep(directory)
    if sweep is not None:
        return Compared(label=label or directory.name, run=None, sweep=sweep)
    run = report.load_run(directory)
    return Compared(label=label or run.label, run=run, sweep=None)


def _cell(value: Any, base: Any) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if isinstance(base, (int, float)) and isinstance(value, (int, float)) and base:
        text += f"  (×{value / base:.2f})"
    return text


def ratio_rows(values: list[dict[str, Any]], keys: tuple[str, ...]) -> list[list[str]]:
    """One row per key: each run's value and its ratio to the first run's."""
    base = values[0]
    return [[key, *(_cell(v.get(key), base.get(key)) for v in values)] for key in keys]


def _sweep_best(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per sweep: the highest value each throughput metric reached over the rates."""
    out = {}
    for key in SWEEP_KEYS:
        seen = [p[key] for p in points if p.get(key) is not None]
        out[key] = max(seen) if seen else None
    return out


def _print(title: str, labels: list[str], rows: list[list[str]], console) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def compare(directories: list[Path], output_dir: Path, labels: list[str] | None = None, console=None) -> list[Path]:
    """Print the ratio tables and write the comparison charts; returns the chart paths."""
    from rich.console import Console

    console = console or Console()
    if len(directories) < 2:
        raise RunDirectoryError("compare needs at least two run directories")
    if labels is not None and len(labels) != len(directories):
        raise RunDirectoryError("give one --labels entry per run directory")
    items = [load(d, labels[i] if labels else None) for i, d in enumerate(directories)]
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = [c for c in items if c.run is not None]
    if len(runs) >= 2:
        _print("Runs compared (ratio to the first)", [c.label for c in runs],
               ratio_rows([c.run.result for c in runs], RATIO_KEYS), console)
        slo = runs[0].run.result.get("slo_ms")
        written.append(charts.latency_cdfs([(c.label, c.run.samples_ms) for c in runs], slo,
                                           output_dir / "compare_latency_cdf.png"))
    sweeps = [c for c in items if c.sweep is not None]
    if len(sweeps) >= 2:
        _print("Sweeps compared: best over all rates (ratio to the first)", [c.label for c in sweeps],
               ratio_rows([_sweep_best(c.sweep) for c in sweeps], SWEEP_KEYS), console)
        series = [(c.label, c.sweep) for c in sweeps]
        written.append(charts.sweep_throughput(series, output_dir / "compare_sweep_throughput.png"))
        if path := charts.sweep_attainment(series, output_dir / "compare_sweep_slo_attainment.png"):
            written.append(path)
    if not written:
        raise RunDirectoryError("compare needs two single runs or two sweeps (got one of each)")
    for path in written:
        console.print(f"wrote {path}")
    return written
