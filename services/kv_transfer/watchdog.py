"""Deadline watch: one thread per transport that times transfers out.

Lifecycle: started with the transport, fed a (deadline, callback) per
transfer, stopped at close. Callbacks re-check their own deadline, so an entry
whose transfer finished or got a later deadline is harmless when it fires.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class DeadlineWatch:
    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"kv-deadlines-{name}")

    def start(self) -> None:
        self._thread.start()

    def schedule(self, deadline: float, fn: Callable[[], None]) -> None:
        """Call `fn()` on this thread at or after `deadline` (time.monotonic clock)."""
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), fn))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # noqa: BLE001 - one bad callback must not stop every timeout
                log.exception("deadline callback failed")
