"""The engine's counters, and the begin/end brackets every store and retrieve runs in.

A bracket is the one place where a transfer's outcome is recorded: events (start and end,
through :class:`~kvhive.observability.publish.EngineTelemetry`), the in-flight copy table
that ``/healthcheck`` reads, and the counters below.  It records on every way out of the
body, an exception included, so a failed copy is counted once and its span always ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from kvhive.keys import ObjectKey
from kvhive.observability.health import InFlight
from kvhive.observability.publish import EngineTelemetry, RetrieveTally, StoreTally
from kvhive.wire.types import CacheKey

COUNTERS = (
    "stored_chunks",
    "store_skipped_resident",
    "store_dropped",
    "retrieved_chunks",
    "retrieve_failures",
    "lookups",
    "lookup_hit_chunks",
    "lookup_chunks",
    "sessions_evicted",  # ended early to keep the session table bounded (MAX_SESSIONS)
    "store_copy_failures",  # device copies that failed after the store's reply
    "retrieve_copy_failures",  # device copies that failed after the retrieve's reply
)


class EngineStats:
    """Monotonic counters of the engine (names in ``COUNTERS``); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(COUNTERS, 0)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                self._counters[name] += d

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)


class TransferBrackets:
    """Context managers around one store or retrieve (see the module docstring)."""

    def __init__(self, telemetry: EngineTelemetry, inflight: InFlight, stats: EngineStats):
        self.telemetry = telemetry
        self.inflight = inflight
        self.stats = stats

    @contextmanager
    def storing(
        self, key: CacheKey, instance_id: int, *, object_nbytes: int, server_copies: bool = True
    ) -> Iterator[StoreTally]:
        """The body sets ``tally.stored``/``tally.skipped`` once the objects are committed;
        ``server_copies=False`` when the worker copied (no in-flight copy, no timing)."""
        with ExitStack() as stack:
            tally = stack.enter_context(
                self.telemetry.storing(
                    key, instance_id, object_nbytes=object_nbytes, worker_copied=not server_copies
                )
            )
            if server_copies:
                stack.enter_context(self.inflight.track("store", key.request_id))
            try:
                yield tally
            finally:
                self.stats.add(stored_chunks=tally.stored, store_skipped_resident=tally.skipped)

    @contextmanager
    def retrieving(
        self,
        key: CacheKey,
        instance_id: int,
        keys: Sequence[ObjectKey],
        *,
        object_nbytes: int,
        server_copies: bool = True,
    ) -> Iterator[RetrieveTally]:
        """The body sets ``tally.ok`` when every chunk reached the engine; anything else
        (an exception included) counts one failed retrieve."""
        with ExitStack() as stack:
            tally = stack.enter_context(
                self.telemetry.retrieving(
                    key,
                    instance_id,
                    keys=keys,
                    object_nbytes=object_nbytes,
                    worker_copied=not server_copies,
                )
            )
            if server_copies:
                stack.enter_context(self.inflight.track("retrieve", key.request_id))
            try:
                yield tally
            finally:
                if tally.ok:
                    self.stats.add(retrieved_chunks=len(keys))
                else:
                    self.stats.add(retrieve_failures=1)
