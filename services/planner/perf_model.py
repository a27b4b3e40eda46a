"""Performance models: how long a prefill and a decode step take on a machine.

Built from profile CSVs in Splitwise's format (`splitwise_perf_model.csv`,
and what `pdserve profile` writes):
`model,hardware,prompt_size,batch_size,token_size,peak_power,average_power,
prompt_time,token_time,e2e_time,tensor_parallel`, times in milliseconds.

- Prefill time is a function of the tokens in the prefill batch
  (prompt_size x batch_size), as in Splitwise's simulator: the median over
  repeated runs at each token count, piecewise-linear between measured
  points, linear beyond the ends.
- Decode step time, three models (`decode_model`):
  - "physical" (default, `decode_model.py`): weights and KV bytes over the
    memory bandwidth plus a per-request compute term, fitted to every decode
    point and bounded by the machine's peak bandwidth and FLOP/s, so it
    holds beyond the profile's batch sizes and contexts;
  - "batch": piecewise linear in the batch size (the sweep over batch sizes
    at one prompt size), plus a per-context-token term fitted on the batch-1
    runs over prompt sizes; linear extension past the last point;
  - "flat" (`decode_model.FlatDecode`): the measured batch curve held flat
    past the profile, floored at the roofline: the fastest step the profile
    allows if a bigger batch is never faster, a lower bound to check whether
    a conclusion depends on the extension;
  - "splitwise-sim": as Splitwise's simulator computes it.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import os
import statistics
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pdserve.planner.decode_model import (DecodeLimits, DecodePoint, FlatDecode, PhysicalDecode, fit_physical,
                                         flat_from_points)
from pdserve.planner.errors import ProfileError

SPLITWISE_PROFILE = "splitwise_perf_model.csv"
SPLITWISE_SHA256 = "dbbe505d1d64fc4bd1ec03c50edf944643586de4f68a81e94cbd55dd5bdfbf41"
SPLITWISE_URL = "https://raw.githubusercontent.com/Mutinifni/splitwise-sim/main/data/perf_model.csv"
DECODE_MODELS = ("physical", "batch", "flat", "splitwise-sim")
COLUMNS = ("model", "hardware", "prompt_size", "batch_size", "token_size", "peak_power", "average_power",
           "prompt_time", "token_time", "e2e_time", "tensor_parallel")


class Interp1D:
    """Piecewise-linear y(x) through points, extended linearly past both ends, floored at `floor`."""

    def __init__(self, xs: list[float], ys: list[float], floor: float = 0.0) -> None:
        if not xs:
            raise ProfileError("no points to interpolate")
        self.xs, self.ys, self.floor = list(xs), list(ys), floor

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return max(ys[0], self.floor)
        i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), self.floor)


@dataclass
class PerfModel:
    """Times in seconds for one (model, hardware, tensor parallel)."""

    prefill: Interp1D  # batch prompt tokens -> seconds
    decode: Interp1D  # batch size -> seconds per step, at `ref_context` tokens per request
    ref_context: float = 0.0
    context_slope: float = 0.0  # seconds per step per extra context token in the batch
    step_model: PhysicalDecode | FlatDecode | None = None  # when set, decode steps follow it instead of `decode`

    def prefill_time(self, batch_tokens: int) -> float:
        return self.prefill(batch_tokens)

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float:
        if self.step_model is not None:
            ctx = batch_size * self.ref_context if context_tokens is None else context_tokens
            return self.step_model.step_time(batch_size, ctx)
        base = self.decode(batch_size)
        if context_tokens is None or not self.context_slope:
            return base
        # floor at half the measured time: the fitted slope must not make a step free
        return max(base + self.context_slope * (context_tokens - batch_size * self.ref_context), 0.5 * base)

    @classmethod
    def constant(cls, prefill_s: float, step_s: float) -> "PerfModel":
        """Fixed times, for hand-computed timelines in tests."""
        return cls(Interp1D([1.0], [prefill_s]), Interp1D([1.0], [step_s]))


def _median_by(rows: list[dict], key, value: str) -> tuple[list[float], list[float]]:
    groups: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r[value])
    xs = sorted(groups)
    return xs, [statistics.median(groups[x]) for x in xs]


def _fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, never negative (noise must not make long contexts faster)."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    num = sum((x - mx) * (y - my) for x, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return max(num / den, 0.0)


def decode_points(rows: list[dict], per_config: bool = False) -> list[DecodePoint]:
    """The profile's decode points: per batch size, the median step over its runs, at their median context.

    A run generating `token_size` tokens holds on average prompt + token_size / 2
    cached tokens per request. Runs are pooled by batch size because the batch-1
    runs over prompt sizes scatter by +-6% with no trend (Splitwise's H100 rows:
    28.3-31.9 ms for 192-8256 tokens): fitted one by one, that noise, not the
    batch size, would set the parameters.

    `per_config`: one point per (prompt size, batch size, output length), the
    median of its repeats. Pooling hides the batch-1 sweep over prompt sizes,
    the only runs where context grows without the batch; with no peak bandwidth
    to bound the context term, the fit then blames context for what the batch
    costs (demo CPU profile: 0.010 ms per cached token and nothing per request,
    68% off on its batch-1 1,024-token runs; per configuration: 12%).
    """
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        b = r["batch_size"]
        key = (b, r["prompt_size"], r["token_size"]) if per_config else (b,)
        groups[key].append((b * (r["prompt_size"] + r["token_size"] / 2), r["token_time"] / 1000))
    return [DecodePoint(k[0], statistics.median(c for c, _ in v), statistics.median(t for _, t in v))
            for k, v in sorted(groups.items())]


def build_model(rows: list[dict], decode_model: str = "physical", limits: DecodeLimits | None = None) -> PerfModel:
    """One PerfModel from the rows of one (model, hardware, tensor parallel).

    decode_model "splitwise-sim" reproduces Splitwise's simulator: it fits
    token time against prompt_size x batch_size but looks it up by the number
    of requests in the batch, so a decode step costs about the batch-1 time at
    any batch size. Useful to compare with the paper's numbers; not a model
    of a real engine.
    """
    xs, ys = _median_by(rows, lambda r: r["prompt_size"] * r["batch_size"], "prompt_time")
    prefill = Interp1D(xs, [y / 1000 for y in ys], floor=min(ys) / 1000 * 0.1)
    if decode_model == "splitwise-sim":
        tx, ty = _median_by(rows, lambda r: r["prompt_size"] * r["batch_size"], "token_time")
        return PerfModel(prefill, Interp1D(tx, [y / 1000 for y in ty], floor=min(ty) / 1000 * 0.5))
    if decode_model not in DECODE_MODELS:
        raise ProfileError(f"unknown decode model {decode_model!r}: use one of {', '.join(DECODE_MODELS)}")
    # the prompt size with the widest batch sweep is where decode-vs-batch was measured
    sweep: dict[int, set[int]] = defaultdict(set)
    for r in rows:
        sweep[r["prompt_size"]].add(r["batch_size"])
    ref_prompt = max(sweep, key=lambda p: (len(sweep[p]), -p))
    at_ref = [r for r in rows if r["prompt_size"] == ref_prompt]
    bx, by = _median_by(at_ref, lambda r: r["batch_size"], "token_time")
    decode = Interp1D(bx, [y / 1000 for y in by], floor=min(by) / 1000 * 0.5)
    ref_context = ref_prompt + statistics.median(r["token_size"] for r in at_ref) / 2
    single = [(r["prompt_size"] + r["token_size"] / 2, r["token_time"] / 1000) for r in rows if r["batch_size"] == 1]
    step_model: PhysicalDecode | FlatDecode | None = None
    if decode_model == "physical":
        limits = limits or DecodeLimits()
        # a peak bandwidth bounds the context term; without one, only the per-configuration runs separate it
        step_model = fit_physical(decode_points(rows, per_config=limits.peak_bandwidth is None), limits)
    elif decode_model == "flat":
        step_model = flat_from_points(decode_points(rows), limits or DecodeLimits())
    return PerfModel(prefill, decode, ref_context, _fit_slope(single), step_model)


class ProfileSet:
    """All (model, hardware, tensor parallel) performance models in one or more CSVs."""

    def __init__(self, rows: list[dict], decode_model: str = "physical") -> None:
        self.decode_model = decode_model
        self._rows: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
        for r in rows:
            self._rows[(r["model"], r["hardware"], r["tensor_parallel"])].append(r)
        self._models: dict[tuple, PerfModel] = {}

    @classmethod
    def from_csv(cls, *paths: str | os.PathLike, decode_model: str = "physical") -> "ProfileSet":
        rows: list[dict] = []
        for path in paths:
            rows.extend(read_profile_csv(path))
        return cls(rows, decode_model)

    def keys(self) -> list[tuple[str, str, int]]:
        return sorted(self._rows)

    def get(self, model: str, hardware: str, tensor_parallel: int | None = None,
            limits: DecodeLimits | None = None) -> PerfModel:
        """The model of one (model, hardware, tp); `limits` bound the physical decode fit (see decode_model)."""
        matches = [k for k in self._rows if k[0] == model and k[1] == hardware
                   and (tensor_parallel is None or k[2] == tensor_parallel)]
        if not matches:
            raise ProfileError(f"no profile rows for model={model!r} hardware={hardware!r} tp={tensor_parallel}; "
                               f"profiles hold {self.keys()}")
        key = max(matches, key=lambda k: k[2])
        cache_key = (*key, limits)
        if cache_key not in self._models:
            self._models[cache_key] = build_model(self._rows[key], self.decode_model, limits)
        return self._models[cache_key]


def read_profile_csv(path: str | os.PathLike) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"model", "hardware", "prompt_size", "batch_size", "prompt_time", "token_time"} - set(
                reader.fieldnames or ())
            if missing:
                raise ProfileError(f"{path}: missing columns {sorted(missing)}")
            return [_parse_row(r) for r in reader]
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"{path}: bad value: {exc}") from None


def _parse_row(r: dict) -> dict:
    return {
        "model": r["model"], "hardware": r["hardware"],
        "prompt_size": int(r["prompt_size"]), "batch_size": int(r["batch_size"]),
        "token_size": int(r.get("token_size") or 0), "tensor_parallel": int(r.get("tensor_parallel") or 1),
        "prompt_time": float(r["prompt_time"]), "token_time": float(r["token_time"]),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_profile_path() -> Path:
    """Splitwise's profile: $PDSERVE_PROFILE_DIR, then ../shared/profiles, then a verified cached download."""
    candidates = []
    if os.environ.get("PDSERVE_PROFILE_DIR"):
        candidates.append(Path(os.environ["PDSERVE_PROFILE_DIR"]) / SPLITWISE_PROFILE)
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo.parent / "shared" / "profiles" / SPLITWISE_PROFILE)
    for c in candidates:
        if c.is_file():
            return c
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve" / "profiles" / SPLITWISE_PROFILE
    if cache.is_file() and _sha256(cache) == SPLITWISE_SHA256:
        return cache
    return _download(cache)


def _download(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(SPLITWISE_URL, timeout=60) as resp:
            tmp.write_bytes(resp.read())
    except OSError as exc:
        raise ProfileError(f"no local {SPLITWISE_PROFILE} and download from {SPLITWISE_URL} failed: {exc}; "
                           "pass --profile PATH or set PDSERVE_PROFILE_DIR") from None
    digest = _sha256(tmp)
    if digest != SPLITWISE_SHA256:
        tmp.unlink(missing_ok=True)
        raise ProfileError(f"downloaded profile has sha256 {digest}, expected {SPLITWISE_SHA256}")
    tmp.replace(dest)
    return dest


def resolve_profile(path: str | None) -> Path:
    """A user's path as given (it must exist), or the Splitwise profile."""
    if path and path not in ("splitwise", "default"):
        p = Path(path)
        if not p.is_file():
            raise ProfileError(f"profile {path} does not exist")
        return p
    return default_profile_path()
