"""Engine-core requests that nobody reads any more, found and aborted.

vLLM's front end (AsyncLLM) and its engine core are two processes. An abort
that crosses a request's own add on the way to the core, or a cancel that lands
inside vLLM's add (the front end then still holds the request, but no task
reads it), can leave a request in the core's queues that nobody will read or
abort again. On a decode instance such a request can wait forever for KV that
will never come, holding its blocks. The worker's load probe brings back the
ids the core has queued or running; an id that no request task of the worker
reads for `grace_s` (two probes at least, so an abort already on its way is
given time) is an orphan, aborted (in the front end and the core) and counted.

Pure: `OrphanWatch.update()` decides, the worker does the abort.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OrphanWatch:
    grace_s: float = 5.0
    aborted: int = 0  # orphans found and aborted since start
    _first_seen: dict[str, float] = field(default_factory=dict)

    def update(self, core_ids: set[str], tracked_ids: set[str], now: float) -> list[str]:
        """Core ids untracked (no task reads them) for `grace_s`: abort these (counted as aborted)."""
        untracked = core_ids - tracked_ids
        self._first_seen = {rid: self._first_seen.get(rid, now) for rid in untracked}
        due = sorted(rid for rid, since in self._first_seen.items() if now - since >= self.grace_s)
        for rid in due:
            del self._first_seen[rid]
        self.aborted += len(due)
        return due
