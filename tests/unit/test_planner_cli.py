"""`pdserve plan` end to end on a toy profile and trace (seconds, no engine)."""

from __future__ import annotations

import csv
import json

import numpy as np

from pdserve.cli.main import main
from pdserve.planner.perf_model import COLUMNS


def write_inputs(tmp_path):
    profile = tmp_path / "toy.csv"
    with open(profile, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for hw, speed in (("slow", 1.0), ("fast", 2.0)):
            for prompt, batch in ((64, 1), (512, 1), (1024, 1), (64, 4), (64, 16)):
                w.writerow(dict(model="toy", hardware=hw, prompt_size=prompt, batch_size=batch, token_size=0,
                                peak_power=0, average_power=0, prompt_time=prompt * batch / 10 / speed,
                                token_time=(5 + batch) / speed, e2e_time=0, tensor_parallel=1))
    trace = tmp_path / "trace.csv"
    rng = np.random.default_rng(1)
    with open(trace, "w", newline="") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for t, p, o in zip(np.cumsum(rng.exponential(0.5, 150)), rng.integers(50, 900, 150), rng.integers(1, 40, 150)):
            f.write(f"{t:.3f},{p},{o}\n")
    return profile, trace


def test_plan_writes_table_json_and_charts(tmp_path, capsys):
    profile, trace = write_inputs(tmp_path)
    out = tmp_path / "plan"
    machines = ["slow:profile_hardware=slow,tensor_parallel=1,cost_per_hour=1,power_kw=1,memory_gb=10",
                "fast:profile_hardware=fast,tensor_parallel=1,cost_per_hour=3,power_kw=1.5,memory_gb=10"]
    argv = ["plan", "--trace", str(trace), "--profile", str(profile), "--model", "toy", "--weight-gb", "1",
            "--kv-bytes-per-token", "100000", "--families", "slow,fast,fast/slow", "--reference", "slow:6",
            "--slo", "ttft_p90=3x", "--slo", "tpot_p90=2x", "--jobs", "1", "--output-dir", str(out)]
    for m in machines:
        argv += ["--machine", m]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "simulated requests/s" in printed and "Throughput at the power budget" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["goals"]) == {"iso_power", "iso_cost", "cost", "power"}
    iso_power = {r["family"]: r for r in plan["goals"]["iso_power"]["best"]}
    assert iso_power["Baseline-SLOW"]["machines"] == 6 and iso_power["Baseline-SLOW"]["rate_vs_baseline"] == 1.0
    assert all(r["power_kw"] <= 6 for r in iso_power.values())
    assert (out / "iso_power.png").is_file() and (out / "iso_cost_split.png").is_file()


def test_plan_reports_user_errors_without_a_traceback(tmp_path, capsys):
    profile, _ = write_inputs(tmp_path)
    _, trace = write_inputs(tmp_path)
    base = ["plan", "--profile", str(profile), "--model", "toy", "--output-dir", str(tmp_path / "o")]
    sizes = ["--weight-gb", "1", "--kv-bytes-per-token", "1000"]
    cases = [
        (sizes + ["--trace", str(tmp_path / "missing.csv")], "does not exist"),
        (["--trace", str(trace)], "model 'toy' is not built in"),
        (sizes + ["--trace", str(trace)], "no profile rows for model='toy' hardware='a100-80gb'"),
        (sizes + ["--trace", str(trace), "--slo", "ttft=fast"], "bad SLO"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
