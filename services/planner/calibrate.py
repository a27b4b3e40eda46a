"""Calibrate the simulator on a live cluster: step costs and serving overheads from `pdserve bench` runs.

Input: a bench run of isolated requests (`--concurrency 1`, the trace's lengths: the "probes")
on the design to model, and optionally a loaded replay on it. Each request's requests.csv row
gives its prompt and output tokens, TTFT and every inter-token gap, which is all a client sees.
From them, with robust lines (Theil-Sen: the median of pairwise slopes, so one request slowed
by a neighbour's job does not tilt the line):

- decode step at batch 1: each probe's mean gap after its first one (a sum of gaps, so tokens
  the gateway merged into one delta still count their time) against its mean context
  (prompt + output / 2): `decode_base_s + decode_per_context_s x context`;
- prefill: each probe's TTFT against its prompt tokens, in vLLM steps of at most
  `budget` tokens: TTFT = dispatch + steps x step base + per-token x prompt, with the
  step base the batch-1 decode step (a step's fixed cost: scheduling, sampling, output);
  what is left of the intercept is `dispatch_s` (gateway, router, Ray, and disaggregated the
  reservation round trip through D);
- disaggregated handoff: the first gap (P's token to D's second) less D's two steps (D's first
  step recomputes the prompt's last token and samples P's token again), median over probes;
- decode cost per request in the batch: from the replay (each request's mean gap against
  the mean number of requests decoding beside it on its instance, Theil-Sen, intercept
  pinned to the batch-1 step), else the shape of an offline profile (`pdserve profile`)
  scaled to the live batch-1 step.

Output: `Calibration` (JSON), which gives the simulator a `PerfModel`, `ServingOverheads`
and a `LinkConfig`, and a profile CSV in Splitwise's format (the fitted lines at the
profiler's grid) that `pdserve plan/simulate --profile` and the router's latency model read.

  python -m pdserve.planner.calibrate RUN/probes --design disaggregated [--replay RUN/rate1] \\
      --output calib.json [--profile-csv live_cpu.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.planner.decode_model import DecodeLimits, PhysicalDecode
from pdserve.planner.errors import PlannerError, TraceError
from pdserve.planner.perf_model import COLUMNS, Interp1D, PerfModel, ProfileSet
from pdserve.planner.sim_config import LinkConfig, ServingOverheads

DEMO_PROFILE = Path(__file__).resolve().parent / "profiles" / "demo_cpu.csv"
DESIGNS = ("disaggregated", "colocated")
# A request whose gaps average less than this reached the client in one burst: its tokens
# waited somewhere between the engine and the client (a starved front end) and its decode time
# went into its TTFT, so both measure the delivery, not the engine. No CPU engine step is this
# short. (Tokens delivered a few steps at a time keep their mean gap: those stay.)
BURST_GAP_S = 0.001


@dataclass(frozen=True)
class Measured:
    """One successful request as the client saw it (seconds from the run's start)."""

    start: float
    prompt: int
    output: int
    ttft: float
    gaps: tuple[float, ...]
    index: int = -1  # bench's request index (which prompt text it got)
    cached: int = 0  # prompt tokens already in the server's prefix cache (`cached_tokens`)

    @property
    def computed(self) -> int:
        return self.prompt - min(self.cached, self.prompt - 1)

    @property
    def first_token(self) -> float:
        return self.start + self.ttft

    @property
    def finish(self) -> float:
        return self.first_token + sum(self.gaps)

    @property
    def streamed(self) -> bool:
        """Its tokens were not all held back and let out at once (see BURST_GAP_S)."""
        rest = self.gaps[1:]
        return bool(rest) and sum(rest) / len(rest) >= BURST_GAP_S


def read_requests(run_dir: Path) -> list[Measured]:
    path = Path(run_dir) / "requests.csv"
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["success"] == "1"]
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc}") from None
    out = [Measured(float(r["start_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]), float(r["ttft_ms"]) / 1000,
                    tuple(float(g) / 1000 for g in (r.get("itl_ms") or "").split()), int(r.get("index") or -1))
           for r in rows]
    if not out:
        raise TraceError(f"{path}: no successful requests")
    return sorted(out, key=lambda m: m.start)


def cached_tokens(prompts: dict[int, int], prior_runs: list[Path], block_size: int = 16) -> dict[int, int]:
    """Prompt tokens of each request (bench index -> prompt tokens) an earlier run left in the prefix cache.

    `pdserve bench` builds prompt i from (seed, i): with the same seed, prompt i of one run and
    prompt i of another are the same words, one a prefix of the other. On a server with prefix
    caching (vLLM's default) the later one finds the common part, in whole blocks, cached.
    """
    seen: dict[int, int] = {}
    for run in prior_runs:
        with open(Path(run) / "requests.csv", newline="") as f:
            for r in csv.DictReader(f):
                if r["success"] == "1":
                    i = int(r["index"])
                    seen[i] = max(seen.get(i, 0), int(r["prompt_tokens"]))
    return {i: min(p, seen.get(i, 0)) // block_size * block_size for i, p in prompts.items()}


def with_cache(requests: list[Measured], prior_runs: list[Path]) -> list[Measured]:
    hits = cached_tokens({m.index: m.prompt for m in requests}, prior_runs)
    return [Measured(m.start, m.prompt, m.output, m.ttft, m.gaps, m.index, hits.get(m.index, 0)) for m in requests]


def theil_sen(xs: list[float], ys: list[float], min_slope: float = 0.0) -> tuple[float, float]:
    """(intercept, slope): the median pairwise slope (at least `min_slope`), the median residual."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if xs[j] != xs[i]]
    slope = max(statistics.median(slopes), min_slope) if slopes else min_slope
    return statistics.median(y - slope * x for x, y in zip(xs, ys)), slope


def prefill_steps(prompt: int, budget: int) -> int:
    return max(math.ceil(prompt / budget), 1)


@dataclass
class Calibration:
    """A live cluster's step costs and overheads (seconds); `fit` holds how well the lines fit."""

    design: str
    budget: int  # vLLM's max_num_batched_tokens
    decode_base_s: float
    decode_per_context_s: float
    decode_per_request_s: float
    prefill_per_token_s: float
    dispatch_s: float
    handoff_s: float = 0.0
    kv_bytes_per_token: int = 2048
    serial_s: float = 0.0  # of the TTFT intercept, the part the prefill instance spends per prompt (serially)
    fit: dict = field(default_factory=dict)

    def prefill_time(self, tokens: float) -> float:
        return self.decode_base_s + self.prefill_per_token_s * tokens

    def decode_step_time(self, batch: int, context: float) -> float:
        return self.decode_base_s + self.decode_per_request_s * (batch - 1) + self.decode_per_context_s * context

    def overheads(self) -> ServingOverheads:
        split = self.design == "disaggregated"
        return ServingOverheads(dispatch_s=max(self.dispatch_s - self.serial_s, 0.0), prefill_request_s=self.serial_s,
                                reservation_at_step=split, decode_first_step=split)

    def link(self) -> LinkConfig:
        # the KV itself is small here (MBs over loopback TCP, mostly sent during the prefill):
        # what the handoff costs is latency, measured as a whole
        return LinkConfig(bandwidth_gbps=1.0, latency_s=self.handoff_s, overlap=0.95)

    def profile_rows(self, model: str, hardware: str) -> list[dict]:
        """The fitted lines at `pdserve profile`'s grid, as profile CSV rows (times in ms)."""
        rows, tokens = [], 32
        grid = [(p, 1) for p in (16, 64, 128, 256, 512, 1024, 2048)] + [(128, b) for b in (2, 4, 8, 16, 32)]
        for prompt, batch in grid:
            prefill = sum(self.prefill_time(min(self.budget, batch * prompt - k * self.budget))
                          for k in range(prefill_steps(batch * prompt, self.budget)))
            step = self.decode_step_time(batch, batch * (prompt + tokens / 2))
            rows.append({"model": model, "hardware": hardware, "prompt_size": prompt, "batch_size": batch,
                         "token_size": tokens, "peak_power": "", "average_power": "", "prompt_time": prefill * 1000,
                         "token_time": step * 1000, "e2e_time": (prefill + step * (tokens - 1)) * 1000,
                         "tensor_parallel": 1})
        return rows

    def perf_model(self) -> PerfModel:
        """The lines themselves as the simulator's model (a step: prefill_time(tokens in it))."""
        prefill = Interp1D([1.0, 2.0], [self.prefill_time(1), self.prefill_time(2)])  # linear past both ends
        step = PhysicalDecode(self.decode_base_s - self.decode_per_request_s, self.decode_per_context_s,
                              self.decode_per_request_s, DecodeLimits())
        return PerfModel(prefill, Interp1D([1.0], [self.decode_base_s]), step_model=step)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise PlannerError(f"cannot read calibration {path}: {exc}") from None


def _decode_batch1(probes: list[Measured], split: bool) -> tuple[float, float, list]:
    """Batch-1 step line over context: each probe's mean gap after the first (D: after its first)."""
    xs, ys = [], []
    for m in probes:
        rest = m.gaps[1:]
        if len(rest) >= 4:
            xs.append(m.prompt + m.output / 2)
            ys.append(sum(rest) / len(rest))
    if len(xs) < 3:
        raise TraceError("calibration needs at least 3 probes with 6+ output tokens")
    base, per_ctx = theil_sen(xs, ys)
    if base <= 0:  # the context slope is noise here: a flat step, the median
        base, per_ctx = statistics.median(ys), 0.0
    return base, per_ctx, list(zip(xs, ys))


def _batch_slope_from_replay(replay: list[Measured], base: float, per_ctx: float,
                             stalls: bool = False) -> tuple[float, int]:
    """Per-request cost: mean gap minus the batch-1 line, against the mean batch beside each request.

    `stalls` (colocated): a request's gaps include the prefill steps it rode through, which the
    simulator adds itself; gaps over 3x the request's median are those and are left out.
    """
    xs, ys = [], []
    spans = [(m.first_token, m.finish) for m in replay]
    for m in replay:
        rest = m.gaps[1:]
        if len(rest) < 4 or not m.streamed:
            continue
        if stalls:
            cut = 3 * sorted(rest)[len(rest) // 2]
            rest = tuple(g for g in rest if g <= cut) or rest
        t0, t1 = m.first_token + m.gaps[0], m.finish
        if t1 <= t0:
            continue
        overlap = sum(max(min(t1, b) - max(t0, a), 0.0) for a, b in spans)  # includes itself
        xs.append(overlap / (t1 - t0) - 1.0)
        ys.append(sum(rest) / len(rest) - base - per_ctx * (m.prompt + m.output / 2))
    if len(xs) < 3:
        return 0.0, len(xs)
    # the line through the batch-1 point: the median of the per-request slopes
    slopes = [y / x for x, y in zip(xs, ys) if x > 0.05]
    return (max(statistics.median(slopes), 0.0) if slopes else 0.0), len(xs)


def _batch_slope_from_profile(profile: Path, base: float) -> float:
    """An offline profile's per-request step cost, as a share of its batch-1 step, times the live one."""
    rows = ProfileSet.from_csv(profile)._rows
    points = [(r["batch_size"], r["token_time"]) for key in rows for r in rows[key] if r["prompt_size"] == 128]
    by_batch: dict[int, list[float]] = {}
    for b, t in points:
        by_batch.setdefault(b, []).append(t)
    bs = sorted(by_batch)
    if len(bs) < 2:
        return 0.0
    med = {b: statistics.median(by_batch[b]) for b in bs}
    intercept, slope = theil_sen([float(b) for b in bs], [med[b] for b in bs])
    one = intercept + slope
    return base * slope / one if one > 0 else 0.0


def calibrate(probes: list[Measured], design: str, budget: int = 2048, replay: list[Measured] | None = None,
              shape_profile: Path | None = DEMO_PROFILE, kv_bytes_per_token: int = 2048) -> Calibration:
    if design not in DESIGNS:
        raise PlannerError(f"unknown design {design!r}: use one of {', '.join(DESIGNS)}")
    split = design == "disaggregated"
    bursts = sum(not m.streamed for m in probes)
    probes = [m for m in probes if m.streamed]
    base, per_ctx, d_points = _decode_batch1(probes, split)
    # TTFT = dispatch + steps x base + per_token x prompt: a line in prompt once the step bases are taken off
    xs = [float(m.computed) for m in probes]
    ys = [m.ttft - prefill_steps(m.computed, budget) * base for m in probes]
    dispatch, per_token = theil_sen(xs, ys)
    handoff = 0.0
    if split:
        first = [m.gaps[0] - 2 * (base + per_ctx * m.prompt) for m in probes if m.gaps]
        handoff = max(statistics.median(first), 0.0) if first else 0.0
    if replay:
        per_request, used = _batch_slope_from_replay(replay, base, per_ctx, stalls=not split)
        source = f"replay ({used} requests)"
    else:
        per_request = _batch_slope_from_profile(shape_profile, base) if shape_profile else 0.0
        source = f"shape of {shape_profile}"
    fit = {"probes": len(probes), "burst_probes_left_out": bursts, "per_request_source": source,
           "ttft_residuals_ms": [round((m.ttft - dispatch - prefill_steps(m.computed, budget) * base
                                        - per_token * m.computed) * 1000, 1) for m in probes],
           "prefix_cached_tokens": sum(m.cached for m in probes),
           "decode_points_ms": [[round(c), round(t * 1000, 2)] for c, t in d_points]}
    return Calibration(design, budget, base, per_ctx, per_request, per_token, max(dispatch, 0.0), handoff,
                       kv_bytes_per_token, fit=fit)


SERIAL_GRID = tuple(k / 10 for k in range(11))


def fit_serial(cal: Calibration, replay_dir: Path, prior_runs: list[Path] | None = None) -> Calibration:
    """Which share of the TTFT intercept is engine time on the prefill instance (serial) rather than delay.

    Isolated probes cannot tell a fixed delay from a fixed engine cost; load can: engine time
    queues the prompts behind it. Chosen on a loaded replay of the same design, the share (0,
    0.1, .. 1) whose simulated TTFT p50 and p90 are closest to the measured ones (mean |log ratio|).
    """
    from pdserve.planner.replay import calibrated_config, compare, default_pools

    scores = {}
    for share in SERIAL_GRID:
        trial = Calibration(**{**asdict(cal), "serial_s": share * cal.dispatch_s})
        out = compare(Path(replay_dir), trial.perf_model(), "live", "live", default_pools(cal.design), 1_000_000,
                      "least_loaded", calibrated_config(trial), prior_runs=prior_runs)
        pct = out["percentiles"]
        scores[share] = statistics.fmean(abs(math.log(max(pct[k]["simulated_ms"], 1e-9) / pct[k]["measured_ms"]))
                                         for k in ("ttft_p50", "ttft_p90"))
    best = min(scores, key=lambda k: (round(scores[k], 6), k))
    fit = {**cal.fit, "serial_share": best, "serial_scores": {f"{k:.1f}": round(v, 3) for k, v in scores.items()}}
    return Calibration(**{**asdict(cal), "serial_s": best * cal.dispatch_s, "fit": fit})


def write_profile_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probes", type=Path, help="Bench run of isolated requests (--concurrency 1).")
    parser.add_argument("--design", required=True, choices=DESIGNS)
    parser.add_argument("--replay", type=Path, help="A loaded bench run on the same design: the decode cost per "
                                                   "request in the batch, and (with --fit-serial) which share of "
                                                   "the TTFT intercept is prefill-engine time.")
    parser.add_argument("--fit-serial", action="store_true", help="Fit the serial share on --replay.")
    parser.add_argument("--prior", type=Path, nargs="*", default=[],
                        help="Runs the same server served before the probes (same bench seed): their prompts are "
                             "prefixes of the probes' and sit in the prefix cache.")
    parser.add_argument("--replay-prior", type=Path, nargs="*", default=None,
                        help="Runs before --replay (default: --prior and the probes).")
    parser.add_argument("--budget", type=int, default=2048, help="vLLM's max_num_batched_tokens (default 2048).")
    parser.add_argument("--shape-profile", type=Path, default=DEMO_PROFILE,
                        help="Offline profile whose batch sweep gives the per-request cost without --replay.")
    parser.add_argument("--kv-bytes-per-token", type=int, default=2048, help="Demo model, bf16: 2,048.")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--profile-csv", type=Path, help="Also write the fitted lines as a profile CSV.")
    parser.add_argument("--model-name", default="demo_model")
    parser.add_argument("--hardware", default="cpu-live")
    args = parser.parse_args(argv)
    try:
        replay_prior = args.replay_prior if args.replay_prior is not None else [*args.prior, args.probes]
        cal = calibrate(with_cache(read_requests(args.probes), args.prior), args.design, args.budget,
                        with_cache(read_requests(args.replay), replay_prior) if args.replay else None,
                        args.shape_profile, args.kv_bytes_per_token)
        if args.fit_serial and args.replay:
            cal = fit_serial(cal, args.replay, replay_prior)
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cal.save(args.output)
    if args.profile_csv:
        write_profile_csv(args.profile_csv, cal.profile_rows(args.model_name, args.hardware))
    print(f"{args.design}: decode step {cal.decode_base_s * 1000:.2f} ms + {cal.decode_per_request_s * 1000:.3f} ms "
          f"per extra request + {cal.decode_per_context_s * 1e6:.3f} us per context token; prefill "
          f"{cal.prefill_per_token_s * 1e6:.1f} us per token + {cal.decode_base_s * 1000:.2f} ms per step; dispatch "
          f"{cal.dispatch_s * 1000:.1f} ms (of which prefill-engine time {cal.serial_s * 1000:.1f} ms); handoff "
          f"{cal.handoff_s * 1000:.1f} ms -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
