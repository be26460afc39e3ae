"""Process diagnostics started with the server: the GC monitor and extra logging.

``--enable-gc-monitor`` times every CPython garbage collection (``gc.callbacks``) and logs
those of at least ``--gc-monitor-min-pause-ms`` at INFO, with the most common object types
of the collected generation when ``--gc-monitor-top-objects N`` is set (that walk costs
time on a big heap, so it is off by default).  ``--enable-extra-logging`` logs, every
``--extra-logging-interval`` seconds, the chunks stored and retrieved since the last line
(and their rate) and L1 usage, from the server's own counters.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kvhive.config import ObservabilityConfig

log = logging.getLogger("kvhive.diagnostics")

MIN_EXTRA_LOGGING_INTERVAL_S = 1.0
"""Lines at most once a second (the reference's heartbeat limits it the same way)."""


class GcMonitor:
    """Logs slow garbage collections (module docstring).  ``start``/``stop`` add and remove
    the ``gc.callbacks`` entry; the callback runs on whichever thread triggered the pass."""

    def __init__(self, min_pause_ms: float, top_objects: int = 0) -> None:
        self.min_pause_s = min_pause_ms / 1000.0
        self.top_objects = top_objects
        self._started: dict[int, float] = {}
        self.logged = 0

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        generation = int(info.get("generation", -1))
        if phase == "start":
            self._started[generation] = time.perf_counter()
            return
        began = self._started.pop(generation, None)
        if began is None:
            return
        pause = time.perf_counter() - began
        if pause < self.min_pause_s:
            return
        self.logged += 1
        top = ""
        if self.top_objects > 0:
            counts = collections.Counter(
                type(o).__name__ for o in gc.get_objects(generation=generation)
            )
            top = "; top objects: " + ", ".join(
                f"{name}={n}" for name, n in counts.most_common(self.top_objects)
            )
        log.info(
            "gc: generation %d took %.2f ms (collected %d, uncollectable %d)%s",
            generation,
            pause * 1000.0,
            int(info.get("collected", 0)),
            int(info.get("uncollectable", 0)),
            top,
        )


class ExtraLogging:
    """A daemon thread logging transfer counts and L1 usage every ``interval`` seconds.
    ``status`` is the server's ``status()`` (``counters`` and ``l1``)."""

    def __init__(self, status: Callable[[], dict[str, Any]], interval: float) -> None:
        self._status = status
        self.interval = max(MIN_EXTRA_LOGGING_INTERVAL_S, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvhive-extra-logging", daemon=True)
        self._last: tuple[float, int, int] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.log_once()
            except Exception:  # a diagnostics failure must not end the server
                log.exception("extra logging failed")

    def log_once(self) -> str:
        """Log one line (and return it, for tests)."""
        status = self._status()
        counters = status.get("counters", {})
        l1 = status.get("l1", {})
        now = time.monotonic()
        stored = int(counters.get("stored_chunks", 0))
        retrieved = int(counters.get("retrieved_chunks", 0))
        last = self._last or (now, stored, retrieved)
        self._last = (now, stored, retrieved)
        span = max(now - last[0], 1e-9)
        line = (
            f"stored {stored - last[1]} chunks ({(stored - last[1]) / span:.1f}/s), retrieved "
            f"{retrieved - last[2]} chunks ({(retrieved - last[2]) / span:.1f}/s) in the last "
            f"{span:.1f} s; L1 {int(l1.get('used_bytes', 0)) / 2**30:.3f} of "
            f"{int(l1.get('configured_bytes', 0)) / 2**30:.3f} GiB "
            f"({100.0 * float(l1.get('usage', 0.0)):.1f}%), {int(l1.get('objects', 0))} objects"
        )
        log.info("extra logging: %s", line)
        return line


class Diagnostics:
    """The diagnostics ``config`` turns on, started and stopped together."""

    def __init__(self, config: ObservabilityConfig, status: Callable[[], dict[str, Any]]):
        self.gc = (
            GcMonitor(config.gc_monitor_min_pause_ms, config.gc_monitor_top_objects)
            if config.enable_gc_monitor
            else None
        )
        self.extra = (
            ExtraLogging(status, config.extra_logging_interval)
            if config.enable_extra_logging
            else None
        )

    def start(self) -> None:
        if self.gc is not None:
            self.gc.start()
        if self.extra is not None:
            self.extra.start()

    def stop(self) -> None:
        if self.gc is not None:
            self.gc.stop()
        if self.extra is not None:
            self.extra.stop()
