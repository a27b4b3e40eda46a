"""Shared links: concurrent KV transfers split a machine's link bandwidth, max-min fairly.

Each machine has one link of the same bandwidth, used outbound by the
transfers it sends (a prefill machine) and inbound by the ones it receives (a
decode machine). A transfer crosses its sender's and its receiver's link;
rates are max-min fair (progressive filling): every transfer gets an equal
share of its tightest link, and what a transfer cannot use on its other link
goes to the transfers there. Two transfers out of one prefill machine to two
idle decode machines each run at half the bandwidth; a transfer alone runs at
full bandwidth.

Lifecycle of a transfer: `add` (at the end of the prefill that produced it,
with the bytes layer-wise sending did not already hide) -> rates are
recomputed whenever a transfer starts or ends -> `pop_finished` returns it
once its bytes are through. The owner (the simulator) schedules a wake-up at
`next_finish()`; `version` changes whenever that time may have, so a stale
wake-up is recognised and ignored.

Pure: no clocks, times are passed in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

_DONE_BYTES = 1e-6  # a transfer this close to done is done (float residue of rate x time)
_DONE_S = 1e-9  # ... or this close in time: below a clock's resolution, now + left == now


@dataclass
class _Flow:
    src: int
    dst: int
    remaining: float  # bytes
    rate: float = 0.0  # bytes/s


class SharedLinks:
    """Active transfers and their fair rates; `bandwidth` in bytes/s per machine link."""

    def __init__(self, bandwidth: float) -> None:
        if bandwidth <= 0:
            raise ValueError("link bandwidth must be positive")
        self.bandwidth = bandwidth
        self.flows: dict[int, _Flow] = {}
        self.now = 0.0
        self.version = 0

    def _advance(self, now: float) -> None:
        dt = now - self.now
        if dt > 0:
            for f in self.flows.values():
                f.remaining -= f.rate * dt
        self.now = max(self.now, now)

    def add(self, now: float, flow_id: int, src: int, dst: int, nbytes: float) -> None:
        self._advance(now)
        self.flows[flow_id] = _Flow(src, dst, max(nbytes, 0.0))
        self._rebalance()

    def pop_finished(self, now: float) -> list[int]:
        """Transfers whose bytes are all through by `now` (removed; the rest are re-rated)."""
        self._advance(now)
        done = [k for k, f in self.flows.items() if f.remaining <= max(_DONE_BYTES, f.rate * _DONE_S)]
        for k in done:
            del self.flows[k]
        if done:
            self._rebalance()
        return done

    def next_finish(self) -> float | None:
        times = [self.now + max(f.remaining, 0.0) / f.rate for f in self.flows.values() if f.rate > 0]
        return min(times) if times else None

    def _rebalance(self) -> None:
        """Progressive filling: freeze the flows of the tightest link at its fair share, repeat."""
        self.version += 1
        capacity: dict[tuple, float] = defaultdict(lambda: self.bandwidth)
        unfrozen = dict(self.flows)
        while unfrozen:
            users: dict[tuple, list[int]] = defaultdict(list)
            for k, f in unfrozen.items():
                users[("out", f.src)].append(k)
                users[("in", f.dst)].append(k)
            link = min(users, key=lambda lk: capacity[lk] / len(users[lk]))
            share = capacity[link] / len(users[link])
            for k in users[link]:
                f = unfrozen.pop(k)
                f.rate = share
                capacity[("out", f.src)] -= share
                capacity[("in", f.dst)] -= share
