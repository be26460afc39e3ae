"""Whether an L2 tier answers: consecutive failed tasks, judged from the tasks themselves.

A task *fails* when its future raises or is cancelled, when it passes its deadline, or when
every key of it failed with ``ERROR`` (a miss — ``MISSING``, ``CORRUPT`` — is an answer, not a
failure).  After :data:`UNAVAILABLE_AFTER` failures in a row the tier is reported unavailable
(``/healthcheck`` "degraded" reasons, ``/status``, the ``kvhive_l2_adapter_up`` gauge); the
next task that completes makes it available again.  The server keeps serving from L1 and the
other tiers meanwhile: requests never fail because of it (each task is bounded by its
deadline).  No probe runs on an idle tier: with no traffic there is nothing to report.

Thread-safe (one lock); called from adapter completion threads and the controllers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

UNAVAILABLE_AFTER = 3


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """A copy of :class:`TierHealth`'s state (for status and metrics)."""

    available: bool
    consecutive_failures: int
    failures: int
    last_error: str | None
    failing_for_s: float  # seconds since the first failure of the current run, 0 if none

    def to_dict(self) -> dict[str, object]:
        return {
            "available": self.available,
            "consecutive_failures": self.consecutive_failures,
            "failures": self.failures,
            "last_error": self.last_error,
            "failing_for_s": round(self.failing_for_s, 3),
        }


class TierHealth:
    """Consecutive failed tasks of one adapter (module docstring)."""

    def __init__(self, threshold: int = UNAVAILABLE_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.threshold = threshold
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._failures = 0
        self._since: float | None = None
        self._last_error: str | None = None

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._since = None

    def failure(self, why: str) -> None:
        with self._lock:
            self._consecutive += 1
            self._failures += 1
            self._last_error = why
            if self._since is None:
                self._since = self._clock()

    def snapshot(self) -> HealthSnapshot:
        with self._lock:
            since = self._since
            return HealthSnapshot(
                available=self._consecutive < self.threshold,
                consecutive_failures=self._consecutive,
                failures=self._failures,
                last_error=self._last_error,
                failing_for_s=0.0 if since is None else self._clock() - since,
            )
