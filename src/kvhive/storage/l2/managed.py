"""ManagedAdapter: one configured adapter plus kvhive's bookkeeping around it.

The controllers never call an adapter directly: they call this wrapper, which admits stores
against the capacity, records sizes, per-salt usage and eviction order from the outcomes
(``tracker.py``), and counts everything for ``/status``.  Deadlines are the controllers'.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from kvhive.config.l2_adapters import AdapterConfig
from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.storage.eviction import make_policy
from kvhive.storage.l2.base import L2Adapter
from kvhive.storage.l2.futures import (
    CORRUPT,
    ERROR,
    MISSING,
    Outcome,
    outcome,
    reason,
    resolved,
    results,
    then,
)
from kvhive.storage.l2.health import TierHealth
from kvhive.storage.l2.presence import PresenceEvents
from kvhive.storage.l2.tracker import Tracker, Usage

log = logging.getLogger(__name__)
GiB = 1 << 30

_COUNTERS = ("stored", "store_failed", "store_refused_full", "store_timeouts", "lookups",
             "lookup_hits", "lookup_failed", "loaded", "load_failed", "load_corrupt",
             "load_timeouts", "deleted", "scanned", "vanished")  # fmt: skip


class ManagedAdapter:
    """An adapter with capacity, usage, eviction order and counters (module docstring).

    ``spec`` is the adapter's validated config record; the capacity is its configured
    ``capacity_gb`` (GiB) or else the backend's own fixed capacity (0: unbounded).
    """

    def __init__(self, spec: AdapterConfig, adapter: L2Adapter, bus: EventBus = DISABLED) -> None:
        self.spec = spec
        self.bus = bus
        self._tasks = itertools.count(1)
        self.adapter = adapter
        self.index = spec.index
        self.name = spec.label
        capacity = int(spec.capacity_gb * GiB) or adapter.capacity_bytes
        policy = make_policy(spec.eviction.eviction_policy) if spec.eviction else None
        self.tracker = Tracker(capacity, policy)
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.health = TierHealth()
        self.presence = PresenceEvents(bus, self.index, self.name)

    def count(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                self.counters[name] += d
        if deltas.get("store_timeouts") or deltas.get("load_timeouts"):
            self.health.failure("a task passed its deadline")

    def _judge(self, f: Future, what: str) -> None:
        """Record whether task ``f`` (done) answered: an exception, a cancellation or only
        ``ERROR`` keys is a failure; misses are answers (``health.py``)."""
        if f.cancelled():
            self.health.failure(f"{what} cancelled")
            return
        exc = f.exception()
        if exc is not None:
            self.health.failure(f"{what}: {type(exc).__name__}: {exc}")
            return
        res = f.result()
        if res and all(reason(r) == ERROR.reason for r in res):
            self.health.failure(f"{what}: every key failed")
        else:
            self.health.success()

    def unavailable_reason(self) -> str | None:
        """Why this tier counts as unavailable now, or None (``health.py``)."""
        snap = self.health.snapshot()
        if snap.available:
            return None
        return (f"L2 {self.name}: {snap.consecutive_failures} tasks failed in a row for "
                f"{snap.failing_for_s:.0f} s (last: {snap.last_error})")  # fmt: skip

    # -- operations (each returns Future[list[bool]]; never raises) ------------------
    # A load's failed keys keep their ``futures.Miss`` (== False) so callers can tell a
    # missing object from a corrupt one (``futures.reason``).

    def store(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Future:
        sizes = [self.adapter.footprint(b.nbytes) for b in buffers]
        admitted = self.tracker.reserve(keys, sizes)
        pos = [i for i, ok in enumerate(admitted) if ok]
        self.count(store_refused_full=len(keys) - len(pos))
        if not pos:
            return resolved([False] * len(keys))
        sub_keys, sub_sizes = [keys[i] for i in pos], [sizes[i] for i in pos]
        task = next(self._tasks)
        if self.bus.enabled:
            self.bus.publish(ev.L2StoreSubmitted(adapter_index=self.index, task_id=task,
                                                 l2_name=self.name, key_count=len(pos),
                                                 total_bytes=sum(sub_sizes)))  # fmt: skip
        fut = self._submit(self.adapter.submit_store, sub_keys, [buffers[i] for i in pos])

        def settle(f: Future) -> list[bool]:
            self._judge(f, "store")
            res = outcome(f, len(pos))
            self.tracker.settle(sub_keys, sub_sizes, res)
            self.presence.stored([k for k, ok in zip(sub_keys, res, strict=True) if ok])
            self.count(stored=sum(res), store_failed=len(res) - sum(res))
            if self.bus.enabled:
                moved = sum(n for n, ok in zip(sub_sizes, res, strict=True) if ok)
                self.bus.publish(ev.L2StoreCompleted(adapter_index=self.index, task_id=task,
                                                     l2_name=self.name, bytes_transferred=moved,
                                                     succeeded_count=sum(res),
                                                     failed_count=len(res) - sum(res)))  # fmt: skip
            full = [False] * len(keys)
            for i, ok in zip(pos, res, strict=True):
                full[i] = ok
            return full

        return then(fut, settle)

    def lookup(self, keys: Sequence[ObjectKey]) -> Future:
        def seen(f: Future) -> list[bool]:
            self._judge(f, "lookup")
            failed = f.cancelled() or f.exception() is not None
            res = outcome(f, len(keys))
            self.tracker.touched([k for k, ok in zip(keys, res, strict=True) if ok])
            # The backend no longer holds what we counted (its own eviction, a lifecycle
            # rule, another node's delete): stop counting it.
            gone = [] if failed else self.tracker.forget(
                [k for k, ok in zip(keys, res, strict=True) if not ok])  # fmt: skip
            self.count(lookups=len(keys), lookup_hits=sum(res), lookup_failed=int(failed),
                       vanished=len(gone))  # fmt: skip
            if not failed:
                self.presence.looked_up(keys, res, self.tracker.holds, gone)
            return res

        return then(self._submit(self.adapter.submit_lookup, keys), seen)

    def load(
        self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview], request_id: int = 0
    ) -> Future:
        task = next(self._tasks)
        if self.bus.enabled:
            self.bus.publish(ev.L2LoadSubmitted(request_id=request_id, adapter_index=self.index,
                                                task_id=task, l2_name=self.name, key_count=len(keys),
                                                total_bytes=sum(b.nbytes for b in buffers)))  # fmt: skip

        def loaded(f: Future) -> list[Outcome]:
            self._judge(f, "load")
            res = results(f, len(keys))
            self.tracker.touched([k for k, ok in zip(keys, res, strict=True) if ok])
            corrupt = sum(1 for r in res if reason(r) == CORRUPT.reason)
            # Missing objects and corrupt ones (the adapter removed those) are gone.
            missing = [k for k, r in zip(keys, res, strict=True)
                       if reason(r) in (MISSING.reason, CORRUPT.reason)]  # fmt: skip
            gone = self.tracker.forget(missing)
            self.count(loaded=sum(res), load_failed=len(res) - sum(res), load_corrupt=corrupt,
                       vanished=len(gone))  # fmt: skip
            self.presence.missed(missing, gone)
            if self.bus.enabled:
                self.bus.publish(ev.L2LoadCompleted(request_id=request_id, adapter_index=self.index,
                                                    task_id=task, l2_name=self.name,
                                                    loaded_count=sum(res),
                                                    failed_count=len(res) - sum(res)))  # fmt: skip
            return res

        return then(self._submit(self.adapter.submit_load, keys, buffers), loaded)

    def delete(self, keys: Sequence[ObjectKey], why: str = "deleted") -> Future:
        """Delete ``keys``; ``why`` (deleted, evicted) is the presence events' reason."""

        def deleted(f: Future) -> list[bool]:
            res = outcome(f, len(keys))
            if not (f.cancelled() or f.exception()):
                self.tracker.removed(keys)  # removed or already absent: gone either way
                self.presence.gone(keys, why)
            self.count(deleted=sum(res))
            return res

        return then(self._submit(self.adapter.submit_delete, keys), deleted)

    def _submit(self, fn: Any, *args: Any) -> Future:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - task boundary: a submit that throws fails the task
            log.warning("L2 %s: %s failed: %s", self.name, getattr(fn, "__name__", fn), exc)
            fut: Future = Future()
            fut.set_exception(exc)
            return fut

    # -- lifecycle and reporting ---------------------------------------------------------

    def rebuild_usage(self) -> int:
        """Count objects already in the backend (durable adapters); returns how many."""
        try:
            n = self.tracker.add_existing(self.adapter.scan())
        except Exception as exc:  # noqa: BLE001 - a failed scan only costs accuracy of the usage figures
            log.warning("L2 %s: scanning existing objects failed: %s", self.name, exc)
            return 0
        self.count(scanned=n)
        if n:
            log.info("L2 %s: found %d stored objects", self.name, n)
        return n

    def usage(self) -> Usage:
        return self.tracker.usage()

    def status(self) -> dict[str, Any]:
        usage = self.usage()
        with self._lock:
            counters = dict(self.counters)
        try:
            details = self.adapter.status()
        except Exception as exc:  # noqa: BLE001 - status must always answer
            details = {"error": str(exc)}
        return {
            "index": self.index,
            "type": self.spec.type,
            "durable": self.adapter.durable,
            "used_bytes": usage.used_bytes,
            "capacity_bytes": usage.capacity_bytes,
            "objects": usage.objects,
            "bytes_by_cache_salt": dict(usage.bytes_by_salt),
            "eviction_policy": self.spec.eviction.eviction_policy if self.spec.eviction else None,
            "health": self.health.snapshot().to_dict(),
            **counters,
            "adapter": details,
        }

    def close(self) -> None:
        try:
            self.adapter.close()
        except Exception:  # shutdown continues with the next adapter
            log.exception("L2 %s: close failed", self.name)
