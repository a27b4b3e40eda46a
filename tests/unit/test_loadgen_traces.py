"""Trace lookup, download (with a fake fetcher: never the network), checksums, parsing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pdserve.loadgen import traces
from pdserve.loadgen.errors import TraceChecksumError, TraceFormatError, TraceNotFoundError

SHARED_TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"
needs_traces = pytest.mark.skipif(not (SHARED_TRACES / traces.file_name("conv")).is_file(),
                                  reason="../shared/traces not present")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(traces.TRACE_DIR_ENV, raising=False)


def _no_network(url: str) -> bytes:
    raise OSError("network is unreachable (test)")


@needs_traces
@pytest.mark.parametrize("name,rows", [("conv", 19366), ("code", 8819)])
def test_real_traces_load_and_verify(name, rows):
    trace = traces.load(name, SHARED_TRACES, fetch=_no_network)
    assert len(trace) == rows
    assert trace.arrivals_s[0] == 0.0
    assert all(b >= a for a, b in zip(trace.arrivals_s, trace.arrivals_s[1:]))
    assert 50 * 60 < trace.span_s < 60 * 60
    if name == "conv":  # first rows of the published file
        assert trace.context_tokens[:2] == (374, 396) and trace.generated_tokens[:2] == (44, 109)
        assert trace.arrivals_s[1] == pytest.approx(4.314579, abs=1e-6)
        assert trace.mean_rate == pytest.approx(5.53, abs=0.01)


@needs_traces
def test_env_var_is_searched(monkeypatch):
    monkeypatch.setenv(traces.TRACE_DIR_ENV, str(SHARED_TRACES))
    assert traces.locate("code", None, fetch=_no_network).samefile(SHARED_TRACES / traces.file_name("code"))


@needs_traces
def test_checksum_mismatch_is_an_error(tmp_path):
    bad = tmp_path / traces.file_name("conv")
    shutil.copy(SHARED_TRACES / traces.file_name("conv"), bad)
    with bad.open("a") as f:
        f.write("2023-11-16 19:15:00.0000000,1,1\r\n")
    with pytest.raises(TraceChecksumError, match="sha256"):
        traces.load("conv", tmp_path, fetch=_no_network)


def test_missing_and_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(TraceNotFoundError) as info:
        traces.load("conv", tmp_path / "empty", fetch=_no_network)
    message = str(info.value)
    assert "AzureLLMInferenceTrace_conv.csv" in message
    assert "PDSERVE_TRACE_DIR" in message and str(traces.user_cache_dir()) in message
    assert "network is unreachable" in message


@needs_traces
def test_download_verifies_and_caches(tmp_path):
    real = (SHARED_TRACES / traces.file_name("code")).read_bytes()
    urls = []

    def fake_fetch(url: str) -> bytes:
        urls.append(url)
        return real

    trace = traces.load("code", tmp_path / "empty", fetch=fake_fetch)
    assert len(trace) == 8819
    assert urls == ["https://raw.githubusercontent.com/Azure/AzurePublicDataset/master/data/"
                    "AzureLLMInferenceTrace_code.csv"]
    assert (traces.user_cache_dir() / traces.file_name("code")).read_bytes() == real
    traces.load("code", None, fetch=_no_network)  # second time: from the cache, no fetch


def test_download_with_wrong_bytes_is_rejected(tmp_path):
    with pytest.raises(TraceChecksumError):
        traces.load("conv", tmp_path, fetch=lambda url: b"TIMESTAMP,ContextTokens,GeneratedTokens\n")
    assert not (traces.user_cache_dir() / traces.file_name("conv")).exists()


def test_custom_csv_with_float_seconds(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n5.5,10,3\r\n2.5,20,4\r\n")
    trace = traces.load(str(path))
    assert trace.arrivals_s == (0.0, 3.0)  # sorted by time
    assert trace.context_tokens == (20, 10) and trace.generated_tokens == (4, 3)


def test_bad_files(tmp_path):
    with pytest.raises(TraceNotFoundError):
        traces.load(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(TraceFormatError):
        traces.load(str(bad))
