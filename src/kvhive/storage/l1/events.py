"""Ordered, lock-free-for-the-caller delivery of L1 events to listeners.

The object table records events while holding its mutex (so their order is the order of
the state changes) and calls ``drain`` after releasing it.  Exactly one thread drains at a
time; a thread that finds another draining leaves its events to that one, so listeners see
one global order and never run under the table's mutex.  Listeners must not block: they run
on whichever caller thread drains.  A listener that raises is logged and counted
(``failures``, shown as ``listener_failures`` in L1 stats); delivery goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvhive.keys import ObjectKey
from kvhive.storage.l1.records import L1Event, Listener

log = logging.getLogger(__name__)


class EventQueue:
    """Listener list plus a FIFO of (event, keys); see the module docstring."""

    __slots__ = ("_listeners", "_queue", "_draining", "failures")

    def __init__(self) -> None:
        self.failures = 0  # listener calls that raised; written by the one active drainer
        self._listeners: tuple[Listener, ...] = ()
        self._queue: deque[tuple[L1Event, list[ObjectKey]]] = deque()
        self._draining = threading.Lock()

    def add_listener(self, fn: Listener) -> None:
        # Copy-on-write tuple: drainers iterate it without a lock.
        self._listeners = (*self._listeners, fn)

    def record(self, event: L1Event, keys: list[ObjectKey]) -> None:
        """Queue an event (caller holds the table mutex); free when nobody listens."""
        if self._listeners:
            self._queue.append((event, keys))

    def drain(self) -> None:
        """Deliver queued events in order; call without holding the table mutex."""
        while self._queue:
            if not self._draining.acquire(blocking=False):
                return  # the active drainer re-checks the queue after releasing
            try:
                while self._queue:
                    event, keys = self._queue.popleft()
                    for fn in self._listeners:
                        try:
                            fn(event, keys)
                        except Exception:  # a listener bug must not break storage
                            self.failures += 1
                            log.exception("L1 listener %r failed on %s", fn, event)
            finally:
                self._draining.release()


class DropCounter:
    """Counts objects dropped for lack of memory; warns at most once per ``interval`` s.

    Drops are never silent (the reference loses stores without a trace), but one warning
    per dropped batch would flood the log under sustained pressure.  Caller serialises.
    """

    __slots__ = ("total", "_unreported", "_warned_at", "_interval")

    def __init__(self, interval: float = 10.0) -> None:
        self.total = 0
        self._unreported = 0
        self._warned_at = -float("inf")
        self._interval = interval

    def add(self, dropped: int, now: float, used_bytes: int, size_bytes: int) -> None:
        self.total += dropped
        self._unreported += dropped
        if now - self._warned_at >= self._interval:
            log.warning(
                "L1 full: dropped %d store object(s) since the last report (%d in total); "
                "used %d of %d bytes",
                self._unreported,
                self.total,
                used_bytes,
                size_bytes,
            )
            self._unreported = 0
            self._warned_at = now
