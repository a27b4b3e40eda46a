"""Azure LLM inference traces (Splitwise, ISCA 2024): find, download, verify, parse.

The traces are CC-BY 4.0 data from Azure/AzurePublicDataset, not ours, so the
repository does not ship them. Attribution: Patel et al., "Splitwise: Efficient
generative LLM inference using phase splitting", ISCA 2024.

A named trace (`code`, `conv`) is looked up in, in order: the directory given
on the command line, `$PDSERVE_TRACE_DIR`, then the user cache. Missing
everywhere, it is downloaded into the cache; every copy is checked against the
published sha256 before use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pdserve.loadgen.errors import TraceChecksumError, TraceFormatError, TraceNotFoundError

TRACE_SHA256: dict[str, str] = {
    "code": "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
    "conv": "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
}
TRACE_URL = "https://raw.githubusercontent.com/Azure/AzurePublicDataset/master/data/AzureLLMInferenceTrace_{name}.csv"
TRACE_DIR_ENV = "PDSERVE_TRACE_DIR"
HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

# Fetches a URL's bytes; injectable so that tests never touch the network.
Fetcher = Callable[[str], bytes]


@dataclass(frozen=True)
class Trace:
    """A parsed trace: arrival offsets (s, first row at 0) and token counts."""

    name: str
    arrivals_s: tuple[float, ...]
    context_tokens: tuple[int, ...]
    generated_tokens: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.arrivals_s)

    @property
    def span_s(self) -> float:
        return self.arrivals_s[-1] - self.arrivals_s[0] if self.arrivals_s else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the whole trace."""
        return (len(self) - 1) / self.span_s if self.span_s > 0 else float("inf")


def file_name(name: str) -> str:
    return f"AzureLLMInferenceTrace_{name}.csv"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdserve" / "traces"


def search_dirs(trace_dir: Path | None) -> list[Path]:
    dirs = [Path(trace_dir)] if trace_dir is not None else []
    if env := os.environ.get(TRACE_DIR_ENV):
        dirs.append(Path(env))
    dirs.append(user_cache_dir())
    return dirs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, name: str) -> None:
    got = sha256_of(path)
    if got != TRACE_SHA256[name]:
        raise TraceChecksumError(
            f"{path}: sha256 {got} does not match the published {TRACE_SHA256[name]} "
            f"for the {name} trace; delete the file or replace it with the original from "
            f"{TRACE_URL.format(name=name)}")


def http_fetch(url: str) -> bytes:
    import httpx  # only needed when a trace is missing

    response = httpx.get(url, follow_redirects=True, timeout=60.0)
    response.raise_for_status()
    return response.content


def download(name: str, dest_dir: Path, fetch: Fetcher = http_fetch) -> Path:
    """Download a named trace into dest_dir, verify it, and return its path."""
    url = TRACE_URL.format(name=name)
    try:
        data = fetch(url)
    except Exception as exc:  # any network failure: the user needs the same advice
        raise TraceNotFoundError(_missing_message(name, url, exc)) from exc
    if hashlib.sha256(data).hexdigest() != TRACE_SHA256[name]:
        raise TraceChecksumError(f"downloaded {url} but its sha256 does not match {TRACE_SHA256[name]}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / file_name(name)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a half-written file is never mistaken for the trace
    return path


def _missing_message(name: str, url: str, exc: Exception) -> str:
    return (f"the {name} trace is not on this machine and could not be downloaded from {url} "
            f"({type(exc).__name__}: {exc}). Download it yourself and put {file_name(name)} in one of: "
            f"--trace-dir, ${TRACE_DIR_ENV}, or {user_cache_dir()}. "
            "It is the Azure LLM inference trace 2023 (CC-BY 4.0; cite the Splitwise paper, ISCA 2024).")


def locate(spec: str, trace_dir: Path | None = None, fetch: Fetcher = http_fetch) -> Path:
    """Path of a trace given as 'code', 'conv' or a CSV path, downloading if needed."""
    if spec not in TRACE_SHA256:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TraceNotFoundError(f"trace file {path} does not exist (named traces: code, conv)")
        return path
    for directory in search_dirs(trace_dir):
        candidate = directory / file_name(spec)
        if candidate.is_file():
            verify(candidate, spec)
            return candidate
    return download(spec, user_cache_dir(), fetch)


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch, from a float or from '2023-11-16 18:17:03.9799600'."""
    try:
        return float(text)
    except ValueError:
        pass
    # Python's fromisoformat rejects 7 fractional digits, so split them off.
    whole, _, frac = text.partition(".")
    stamp = datetime.fromisoformat(whole).timestamp()
    return stamp + (int(frac) / 10 ** len(frac) if frac else 0.0)


def parse(path: Path, name: str | None = None) -> Trace:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != HEADER:
        raise TraceFormatError(f"{path}: expected the header {','.join(HEADER)}")
    stamps, ctx, gen = [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            ts, c, g = line.split(",")
            stamps.append(_parse_timestamp(ts.strip()))
            ctx.append(int(c))
            gen.append(int(g))
        except ValueError as exc:
            raise TraceFormatError(f"{path}:{lineno}: cannot parse {line!r}") from exc
    if not stamps:
        raise TraceFormatError(f"{path}: no rows")
    order = sorted(range(len(stamps)), key=stamps.__getitem__)
    t0 = stamps[order[0]]
    return Trace(name=name or path.stem,
                 arrivals_s=tuple(stamps[i] - t0 for i in order),
                 context_tokens=tuple(ctx[i] for i in order),
                 generated_tokens=tuple(gen[i] for i in order))


def load(spec: str, trace_dir: Path | None = None, fetch: Fetcher = http_fetch) -> Trace:
    path = locate(spec, trace_dir, fetch)
    return parse(path, name=spec if spec in TRACE_SHA256 else None)
