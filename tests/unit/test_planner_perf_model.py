"""Performance models: interpolation through profile points, and the Splitwise profile."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from pdserve.planner.errors import ProfileError
from pdserve.planner.perf_model import COLUMNS, Interp1D, ProfileSet, read_profile_csv, resolve_profile

SPLITWISE = Path(__file__).resolve().parents[2].parent / "shared" / "profiles" / "splitwise_perf_model.csv"


def write_profile(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"model": "m", "hardware": "hw", "token_size": 0, "peak_power": 0, "average_power": 0,
                        "e2e_time": 0, "tensor_parallel": 1, **r})
    return path


@pytest.fixture
def toy(tmp_path) -> ProfileSet:
    rows = [
        # prefill: 100 ms at 100 tokens, 300 ms at 1000 tokens (batch 2 x 500), twice each (median)
        dict(prompt_size=100, batch_size=1, prompt_time=100, token_time=10),
        dict(prompt_size=100, batch_size=1, prompt_time=120, token_time=10),
        dict(prompt_size=500, batch_size=2, prompt_time=300, token_time=12),
        dict(prompt_size=500, batch_size=2, prompt_time=280, token_time=12),
        # decode sweep at prompt 500: batch 1, 2, 4
        dict(prompt_size=500, batch_size=1, prompt_time=200, token_time=10),
        dict(prompt_size=500, batch_size=4, prompt_time=900, token_time=20),
    ]
    return ProfileSet.from_csv(write_profile(tmp_path / "p.csv", rows), decode_model="batch")


def test_interp_is_linear_between_points_and_beyond_them():
    f = Interp1D([1, 3], [10, 30])
    assert f(2) == pytest.approx(20)
    assert f(5) == pytest.approx(50)  # extended past the end
    assert Interp1D([1, 3], [10, 30], floor=4)(0) == pytest.approx(4)  # floored before the start


def test_prefill_uses_medians_by_batch_tokens(toy):
    m = toy.get("m", "hw")
    assert m.prefill_time(100) == pytest.approx(0.110)  # median of 100 and 120 ms
    assert m.prefill_time(1000) == pytest.approx(0.290)  # 500 x 2
    assert m.prefill_time(550) == pytest.approx(0.200 + (0.290 - 0.200) * 50 / 500)
    assert m.prefill_time(500) == pytest.approx(0.200)


def test_decode_steps_interpolate_over_batch_size(toy):
    m = toy.get("m", "hw")
    assert m.decode_step_time(1) == pytest.approx(0.010)
    assert m.decode_step_time(2) == pytest.approx(0.012)
    assert m.decode_step_time(3) == pytest.approx(0.016)
    assert m.decode_step_time(8) == pytest.approx(0.036)  # the last segment's slope, extended


def test_unknown_model_or_hardware_is_a_profile_error(toy):
    with pytest.raises(ProfileError, match="no profile rows"):
        toy.get("m", "other-hw")


def test_missing_columns_are_reported(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("model,hardware\nm,hw\n")
    with pytest.raises(ProfileError, match="missing columns"):
        read_profile_csv(p)
    with pytest.raises(ProfileError, match="does not exist"):
        resolve_profile(str(tmp_path / "nope.csv"))


needs_splitwise = pytest.mark.skipif(not SPLITWISE.is_file(), reason="Splitwise profile not in ../shared/profiles")


@needs_splitwise
@pytest.mark.parametrize("hardware", ["a100-80gb", "h100-80gb", "h100-80gb-pcap"])
def test_splitwise_profile_reproduces_its_measured_points(hardware):
    rows = [r for r in read_profile_csv(SPLITWISE)
            if r["model"] == "llama2-70b" and r["hardware"] == hardware and r["tensor_parallel"] == 8]
    m = ProfileSet.from_csv(SPLITWISE, decode_model="batch").get("llama2-70b", hardware, 8)
    for tokens in (128, 1024, 4096):  # median over every run with that many batch tokens (1024 = 512 x 2 too)
        measured = statistics.median(r["prompt_time"] for r in rows if r["prompt_size"] * r["batch_size"] == tokens)
        assert m.prefill_time(tokens) == pytest.approx(measured / 1000)
    for batch in (1, 8, 64):  # decode over the batch sweep at prompt 512
        measured = statistics.median(r["token_time"] for r in rows if r["prompt_size"] == 512
                                     and r["batch_size"] == batch)
        assert m.decode_step_time(batch) == pytest.approx(measured / 1000)


@needs_splitwise
def test_h100_beats_a100_and_long_contexts_step_slower():
    ps = ProfileSet.from_csv(SPLITWISE)
    a100, h100 = ps.get("llama2-70b", "a100-80gb", 8), ps.get("llama2-70b", "h100-80gb", 8)
    assert h100.prefill_time(2048) < a100.prefill_time(2048) * 0.6
    assert h100.decode_step_time(16) < a100.decode_step_time(16)
    assert a100.decode_step_time(32, 32 * 4000) > a100.decode_step_time(32, 32 * 500)


@needs_splitwise
def test_splitwise_sim_decode_model_is_flat_in_batch_size():
    m = ProfileSet.from_csv(SPLITWISE, decode_model="splitwise-sim").get("llama2-70b", "a100-80gb", 8)
    assert m.decode_step_time(256) == pytest.approx(m.decode_step_time(1), rel=0.05)


def test_unknown_decode_model(toy, tmp_path):
    with pytest.raises(ProfileError, match="unknown decode model"):
        ProfileSet(read_profile_csv(write_profile(tmp_path / "q.csv", [dict(
            prompt_size=1, batch_size=1, prompt_time=1, token_time=1)])), "magic").get("m", "hw")
