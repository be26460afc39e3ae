"""Data-path health: operations in flight and whether one is past its deadline.

The engine wraps each store/retrieve copy (and the L2 controllers each load) in
``inflight.track(kind)``; ``/healthcheck`` reports unhealthy while any tracked operation has
been running longer than ``--health-copy-deadline-seconds`` — a stuck copy or L2 load, not
just a live process.  Cost per operation: one lock, one dict insert and one delete.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Operation:
    kind: str  # store, retrieve, l2_load, ...
    detail: str
    started: float  # monotonic seconds
    thread: str


class InFlight:
    """Thread-safe table of running data-path operations."""

    def __init__(self, deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
        """``deadline``: seconds after which a running operation counts as stuck
        (``--health-copy-deadline-seconds``)."""
        self.deadline = deadline
        self._clock = clock
        self._ops: dict[int, Operation] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def begin(self, kind: str, detail: str = "") -> int:
        op = Operation(kind, detail, self._clock(), threading.current_thread().name)
        token = next(self._ids)
        with self._lock:
            self._ops[token] = op
        return token

    def end(self, token: int) -> None:
        with self._lock:
            self._ops.pop(token, None)

    @contextmanager
    def track(self, kind: str, detail: str = "") -> Iterator[None]:
        token = self.begin(kind, detail)
        try:
            yield
        finally:
            self.end(token)

    def stuck(self) -> list[dict[str, object]]:
        """Operations running longer than the deadline, oldest first."""
        now = self._clock()
        with self._lock:
            ops = list(self._ops.values())
        late = [op for op in ops if now - op.started > self.deadline]
        late.sort(key=lambda op: op.started)
        return [
            {
                "kind": op.kind,
                "detail": op.detail,
                "running_seconds": round(now - op.started, 3),
                "thread": op.thread,
            }
            for op in late
        ]

    def __len__(self) -> int:
        return len(self._ops)
