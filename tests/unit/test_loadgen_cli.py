"""`pdserve bench` and `pdserve bench compare` through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pdserve.cli.main import build_parser, main
from pdserve.loadgen.fake_server import FakeServer, FakeServerConfig

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = next((p for p in (REPO / "services" / "demo_model", Path("/tmp/smoke_model"))
                  if (p / "tokenizer.json").is_file()), None)


def test_help_documents_the_contract(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    text = capsys.readouterr().out
    for option in ("--base-url", "--model", "--trace", "--rate", "--duration", "--num-requests", "--slo-ttft-ms",
                   "--slo-tpot-ms", "--output-dir", "--sweep-rates", "--concurrency", "--burstiness",
                   "--shared-prefix-fraction", "--input-len", "--length-dist", "--endpoint", "--api-key",
                   "--percentiles", "--slo-ttft-x", "compare"):
        assert option in text


def test_the_two_forms_parse():
    args = build_parser().parse_args(["bench", "compare", "a", "b", "--labels", "x,y"])
    assert args.bench_command == "compare" and [str(p) for p in args.runs] == ["a", "b"] and args.labels == ["x", "y"]
    args = build_parser().parse_args(["bench", "--base-url", "http://h:1", "--model", "m", "--rate", "2"])
    assert args.bench_command is None and args.rate == 2.0


@pytest.mark.parametrize("argv,message", [
    (["--model", "m", "--rate", "1", "--num-requests", "1"], "--base-url and --model are required"),
    (["--base-url", "http://127.0.0.1:9", "--model", "m", "--rate", "1"], "needs --duration and/or --num-requests"),
    (["--base-url", "http://127.0.0.1:9", "--model", "m", "--num-requests", "3"], "need --rate"),
    (["--base-url", "http://127.0.0.1:9", "--model", "m", "--num-requests", "3", "--rate", "1",
      "--slo-ttft-ms", "1", "--slo-ttft-x", "2"], "not both"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys, tmp_path):
    assert main(["bench", *argv, "--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(MODEL_DIR is None, reason="no demo model tokenizer")
def test_cli_run_then_compare(tmp_path, capsys):
    run_a = tmp_path / "a"
    with FakeServer(FakeServerConfig(ttft_s=0.01, itl_s=0.002)) as server:
        rc = main(["bench", "--base-url", server.base_url, "--model", "fake", "--tokenizer", str(MODEL_DIR),
                   "--input-len", "64", "--output-len", "6", "--rate", "40", "--num-requests", "8",
                   "--slo-ttft-ms", "2000", "--percentiles", "90,99.9", "--output-dir", str(run_a),
                   "--label", "A", "--no-progress", "--no-charts"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Request goodput (req/s)" in out and "P99.9 TTFT (ms)" in out
    result = json.loads((run_a / "result.json").read_text())
    assert result["completed"] == 8 and "p99.9_ttft_ms" in result and "p90_itl_ms" in result
    # A second "run" with twice the throughput and half the TTFT, to check the ratios.
    run_b = tmp_path / "b"
    shutil.copytree(run_a, run_b)
    result.update(label="B", request_throughput=2 * result["request_throughput"],
                  mean_ttft_ms=result["mean_ttft_ms"] / 2)
    (run_b / "result.json").write_text(json.dumps(result))
    out_dir = tmp_path / "cmp"
    assert main(["bench", "compare", str(run_a), str(run_b), "--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "×2.00" in out and "×0.50" in out
    assert (out_dir / "compare_latency_cdf.png").stat().st_size > 10_000


def test_compare_rejects_a_non_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    assert main(["bench", "compare", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    assert "holds no result.json" in capsys.readouterr().err
