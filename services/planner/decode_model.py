"""A decode step with a physical form, fitted to profile points, bounded by the hardware.

A decode step of a batch reads every weight once and every cached token of
the batch once (memory-bound), and does a little compute per request:

    step(b, ctx) = overhead + (weight_bytes + kv_bytes_per_token * ctx) / bandwidth + b * per_request

with `b` the requests in the batch and `ctx` their cached tokens together.
The three parameters are fitted to a profile's decode points (the median of
repeated runs at each measured prompt size, batch size and output length)
by minimising the largest relative error (Lawson's iteratively reweighted
least squares), subject to what the machine can do:

- overhead >= 0 (kernel launches, tensor-parallel all-reduces);
- bandwidth <= the machine's peak memory bandwidth, so a step is never
  shorter than its bytes over the peak bandwidth, at any batch or context;
- per_request >= FLOPs per token / the machine's peak FLOP/s.

So beyond the profile (batches of hundreds, contexts of hundreds of
thousands of tokens) the step grows as reading more KV and computing more
tokens make it grow, instead of following the last measured segment.
Without the machine's limits (a profile from `pdserve profile` on an
unlisted machine) the same form is fitted with only non-negativity, and ctx
is counted in tokens.

`FlatDecode` is the opposite reading of the same profile: the fastest step
it allows if a bigger batch is never faster than a smaller one (the measured
curve, held flat past its last batch size) and no step beats the hardware's
roofline. It is a lower bound, not a prediction: a conclusion that holds
under both it and `PhysicalDecode` does not hang on how the profile is
extended.

Pure: numbers in, numbers out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from pdserve.planner.errors import ProfileError

_LAWSON_ITERATIONS = 200


@dataclass(frozen=True)
class DecodeLimits:
    """What bounds a decode step on one instance: its model's bytes and FLOPs, its machine's peaks."""

    weight_bytes: float = 0.0
    kv_bytes_per_token: float = 1.0  # 1: contexts counted in tokens (no machine facts known)
    peak_bandwidth: float | None = None  # bytes/s of the whole instance
    flops_per_token: float = 0.0
    peak_flops: float | None = None  # FLOP/s of the whole instance

    @property
    def min_seconds_per_byte(self) -> float:
        return 1.0 / self.peak_bandwidth if self.peak_bandwidth else 0.0

    @property
    def min_seconds_per_request(self) -> float:
        return self.flops_per_token / self.peak_flops if self.peak_flops else 0.0


@dataclass(frozen=True)
class DecodePoint:
    """One measured decode configuration: `batch` requests with `context` cached tokens in all."""

    batch: float
    context: float
    seconds: float


@dataclass(frozen=True)
class PhysicalDecode:
    """step = overhead + (weights + kv per token x ctx) x seconds_per_byte + batch x per_request."""

    overhead: float
    seconds_per_byte: float
    per_request: float
    limits: DecodeLimits

    @property
    def bandwidth(self) -> float:
        """Effective memory bandwidth the fit found, bytes/s."""
        return 1.0 / self.seconds_per_byte if self.seconds_per_byte > 0 else float("inf")

    def bytes_read(self, context_tokens: float) -> float:
        return self.limits.weight_bytes + self.limits.kv_bytes_per_token * context_tokens

    def step_time(self, batch_size: int, context_tokens: float) -> float:
        return (self.overhead + self.bytes_read(context_tokens) * self.seconds_per_byte
                + batch_size * self.per_request)


def _bounded_lstsq(x: np.ndarray, y: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """min ||x @ theta - y|| subject to theta >= lower, exactly, for a handful of parameters.

    The optimum fixes some parameters at their bounds and is the plain least
    squares solution in the others; with three parameters, trying all eight
    choices of which ones sit at their bounds is cheaper than a QP solver.
    """
    scale = np.maximum(np.abs(x).max(axis=0), 1e-300)  # columns differ by 1e11 (bytes vs requests)
    x, lower = x / scale, lower * scale
    best, best_cost = None, np.inf
    n = x.shape[1]
    # Most parameters at their bounds first, and a later choice must be strictly better: where the
    # points do not determine a parameter (one batch size measured), it stays at its bound.
    choices = sorted(itertools.product((False, True), repeat=n), key=lambda f: (-sum(f), f))
    for fixed in choices:
        theta = lower.copy()
        free = [i for i in range(n) if not fixed[i]]
        if free:
            rest = y - x[:, list(fixed)] @ lower[list(fixed)] if any(fixed) else y
            theta[free] = np.linalg.lstsq(x[:, free], rest, rcond=None)[0]
        if np.any(theta < lower * (1 - 1e-9) - 1e-15):
            continue
        cost = float(np.sum((x @ theta - y) ** 2))
        if cost < best_cost * (1 - 1e-9) - 1e-24:
            best, best_cost = theta, cost
    assert best is not None  # every parameter at its bound is always feasible
    return best / scale


def fit_physical(points: list[DecodePoint], limits: DecodeLimits) -> PhysicalDecode:
    """The bounded parameters with the smallest worst-case relative error over `points`."""
    if not points:
        raise ProfileError("no decode points to fit")
    y = np.array([p.seconds for p in points])
    if np.any(y <= 0):
        raise ProfileError("decode times must be positive")
    x = np.stack([np.ones(len(points)),
                  np.array([limits.weight_bytes + limits.kv_bytes_per_token * p.context for p in points]),
                  np.array([p.batch for p in points], dtype=float)], axis=1)
    # relative errors: divide each row by its measured time
    xr, yr = x / y[:, None], np.ones(len(points))
    lower = np.array([0.0, limits.min_seconds_per_byte, limits.min_seconds_per_request])
    weights = np.full(len(points), 1.0 / len(points))
    best, best_err = None, np.inf
    for _ in range(_LAWSON_ITERATIONS):  # Lawson: reweight towards the worst points -> the minimax fit
        sw = np.sqrt(weights)
        theta = _bounded_lstsq(xr * sw[:, None], yr * sw, lower)
        err = np.abs(xr @ theta - yr)
        if err.max() < best_err - 1e-12:
            best, best_err = theta, float(err.max())
        weights = weights * np.maximum(err, 1e-15)
        weights /= weights.sum()
    assert best is not None
    return PhysicalDecode(float(best[0]), float(best[1]), float(best[2]), limits)


@dataclass(frozen=True)
class FlatDecode:
    """step = max(measured step at this batch size, held flat past the profile; the roofline floor).

    The most favourable step a profile allows: between measured batch sizes it
    interpolates the points (per batch size, as `decode_points` pools them),
    past the largest one it stays at that one's time (a batch of 512 costs what
    a batch of 64 cost), and it never beats the roofline: the larger of the
    bytes read over the peak bandwidth and the FLOPs over the peak compute.
    Context beyond that floor is ignored: the profile's batch-1 runs over
    prompt sizes 128-8192 show no trend to extend.
    """

    batches: tuple[float, ...]
    steps: tuple[float, ...]  # seconds, measured at `batches`
    limits: DecodeLimits

    def roofline(self, batch_size: int, context_tokens: float) -> float:
        lim = self.limits
        memory = (lim.weight_bytes + lim.kv_bytes_per_token * context_tokens) * lim.min_seconds_per_byte
        return max(memory, batch_size * lim.min_seconds_per_request)

    def step_time(self, batch_size: int, context_tokens: float) -> float:
        measured = float(np.interp(batch_size, self.batches, self.steps))  # np.interp holds both ends flat
        return max(measured, self.roofline(batch_size, context_tokens))


def flat_from_points(points: list[DecodePoint], limits: DecodeLimits) -> FlatDecode:
    """The flat lower bound through `points` (one per batch size), made non-decreasing in batch size.

    A measured step shorter than a smaller batch's (noise) is raised to it:
    the bound assumes a bigger batch is never faster, so it must not claim so.
    """
    if not points:
        raise ProfileError("no decode points to fit")
    ordered = sorted(points, key=lambda p: p.batch)
    steps = np.maximum.accumulate([p.seconds for p in ordered])
    if np.any(steps <= 0):
        raise ProfileError("decode times must be positive")
    return FlatDecode(tuple(float(p.batch) for p in ordered), tuple(float(s) for s in steps), limits)
