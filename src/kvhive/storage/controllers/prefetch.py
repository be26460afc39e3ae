"""PrefetchController: a lookup that misses L1 loads the longest servable prefix from L2.

Implements :class:`kvhive.engine.prefetch.Prefetcher`.  Each request runs on one of
``max_in_flight`` worker threads (so at most that many load from L2 at once; the others
wait in arrival order) through these steps::

    lock      keys already resident get the readers' locks at once
    lookup    every adapter is asked about the other keys, in parallel, with a deadline
    plan      longest prefix of rows whose keys are all in L1 or some adapter; each key
              is loaded from the lowest-index adapter that has it
    stage     L1 reservations (owner ``PrefetchOwner(id)``); a key another request is already
              loading is awaited instead; no memory ends the prefix there
    load      one task per adapter, each with its deadline (the adapter's ``timeout_s``)
    admit     loaded objects are committed without write-back events — temporary under
              policy ``default`` (gone after their readers), resident under ``retain`` —
              and read-locked for the readers
    finish    the hit is the prefix of rows fully locked now; locks past it are returned;
              ``done(hit)`` is called exactly once, whatever happened

A load that fails, misses or passes its deadline cuts the prefix at its row: the engine
recomputes those chunks; nothing waits forever.  A timed-out load keeps its reservation
until the adapter really finishes (then it is aborted), so a late write can never land in
memory that was reused.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l1.records import Slot
from kvhive.storage.l2.futures import outcome, reason, results
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.owners import Owner, PrefetchOwner

log = logging.getLogger(__name__)

SizeOf = Callable[[ObjectKey], "int | None"]


@dataclass(eq=False)
class _Request:
    rows: list[list[ObjectKey]]
    owner_of: Callable[[ObjectKey], Owner]
    readers: int
    done: Callable[[int], None]
    pid: int
    locked: set[ObjectKey] = field(default_factory=set)


class PrefetchController:
    """Loads missing prefixes from L2 into L1 (module docstring)."""

    def __init__(
        self,
        l1: L1Manager,
        adapters: Sequence[ManagedAdapter],
        *,
        object_nbytes: SizeOf,
        retain: bool,
        max_in_flight: int,
    ) -> None:
        self.l1 = l1
        self.adapters = list(adapters)
        self.object_nbytes = object_nbytes
        self.retain = retain
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="kvhive-l2-prefetch")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loading: dict[ObjectKey, threading.Event] = {}
        self._queued = 0
        self.counters = {"requests": 0, "hit_chunks": 0, "loaded_objects": 0, "truncated": 0,
                         "timeouts": 0, "failed_loads": 0, "errors": 0, "no_memory": 0}  # fmt: skip

    # -- Prefetcher ----------------------------------------------------------------------

    def prefetch(
        self,
        rows: list[list[ObjectKey]],
        owner_of: Callable[[ObjectKey], Owner],
        num_readers: int,
        done: Callable[[int], None],
    ) -> None:
        req = _Request(rows, owner_of, num_readers, done, next(self._ids))
        with self._lock:
            self._queued += 1
        try:
            self._pool.submit(self._serve, req)
        except RuntimeError:  # shut down: answer at once
            self._finish_cold(req)

    def _serve(self, req: _Request) -> None:
        with self._lock:
            self._queued -= 1
        hit = 0
        try:
            hit = self._run(req)
        except Exception:  # task boundary: this request ends with what it has
            self._count(errors=1)
            log.exception("L2 prefetch %d failed", req.pid)
            hit = self._finish(req, 0)
        finally:
            self._count(requests=1, hit_chunks=hit)
            req.done(hit)

    def _finish_cold(self, req: _Request) -> None:
        with self._lock:
            self._queued -= 1
        req.done(0)

    # -- steps ---------------------------------------------------------------------------

    def _run(self, req: _Request) -> int:
        flat = [key for row in req.rows for key in row]
        self._lock_resident(req, flat)
        missing = [k for k in flat if k not in req.locked]
        if not missing:
            return self._finish(req, len(req.rows))
        holder = self._lookup(missing)
        limit = self._plan(req, holder)
        todo = [k for row in req.rows[:limit] for k in row if k not in req.locked]
        staged, limit = self._stage(req, todo, limit)
        self._load(req, staged, holder)
        return self._finish(req, limit)

    def _lock_resident(self, req: _Request, keys: Sequence[ObjectKey]) -> None:
        by_owner: dict[Owner, list[ObjectKey]] = defaultdict(list)
        for key in keys:
            by_owner[req.owner_of(key)].append(key)
        for owner, group in by_owner.items():
            slots = self.l1.read_lock(group, owner, req.readers)
            req.locked.update(k for k, s in zip(group, slots, strict=True) if s is not None)

    def _lookup(self, keys: list[ObjectKey]) -> dict[ObjectKey, ManagedAdapter]:
        """Which adapter (lowest index) holds each key; a late or failed lookup holds none."""
        futures = [(a, a.lookup(keys)) for a in self.adapters]
        holder: dict[ObjectKey, ManagedAdapter] = {}
        start = time.monotonic()
        for adapter, fut in futures:
            if not _wait(fut, adapter.spec.timeout_s - (time.monotonic() - start)):
                self._count(timeouts=1)
                log.warning("L2 %s: lookup of %d keys timed out", adapter.name, len(keys))
                continue
            for key, ok in zip(keys, outcome(fut, len(keys)), strict=True):
                if ok:
                    holder.setdefault(key, adapter)
        return holder

    def _plan(self, req: _Request, holder: dict[ObjectKey, ManagedAdapter]) -> int:
        for i, row in enumerate(req.rows):
            if any(k not in req.locked and k not in holder for k in row):
                return i
        return len(req.rows)

    def _stage(
        self, req: _Request, keys: list[ObjectKey], limit: int
    ) -> tuple[dict[ObjectKey, Slot], int]:
        """Reserve L1 for ``keys``; returns the staged slots and the prefix that survives."""
        staged: dict[ObjectKey, Slot] = {}
        owner = PrefetchOwner(req.pid)
        by_size: dict[int, list[ObjectKey]] = defaultdict(list)
        lost: set[ObjectKey] = set()
        for key in keys:
            size = self.object_nbytes(key)
            (by_size[size].append(key) if size else lost.add(key))
        for size, group in by_size.items():
            slots = self.l1.reserve(group, size, owner)
            for key, slot in zip(group, slots, strict=True):
                if slot is not None:
                    staged[key] = slot
                elif not self._await_other(req, key):
                    lost.add(key)
        if lost:
            self._count(no_memory=len(lost))
        with self._lock:
            for key in staged:
                self._loading[key] = threading.Event()
        cut = self._first_row_with(req, lost, limit)
        if cut < limit:
            beyond = {k for row in req.rows[cut:limit] for k in row}
            self._abort({k: s for k, s in staged.items() if k in beyond})
            staged = {k: s for k, s in staged.items() if k not in beyond}
        return staged, cut

    def _await_other(self, req: _Request, key: ObjectKey) -> bool:
        """The key is resident or being loaded by another request: wait, then lock it."""
        with self._lock:
            event = self._loading.get(key)
        if event is not None:
            event.wait(max(a.spec.timeout_s for a in self.adapters))
        slots = self.l1.read_lock([key], req.owner_of(key), req.readers)
        if slots[0] is None:
            return False
        req.locked.add(key)
        return True

    def _load(
        self, req: _Request, staged: dict[ObjectKey, Slot], holder: dict[ObjectKey, ManagedAdapter]
    ) -> None:
        """Load staged keys per adapter, admit the good ones, give up the rest."""
        groups: dict[int, list[ObjectKey]] = defaultdict(list)
        for key in staged:
            groups[holder[key].index].append(key)
        started = time.monotonic()
        tasks = []
        for index, keys in groups.items():
            adapter = self.adapters[index]
            adapter.tracker.pin(keys)
            views = [self.l1.view(staged[k]).data for k in keys]
            fut = adapter.load(keys, views, request_id=req.pid)
            fut.add_done_callback(partial(_unpin, adapter, keys))
            tasks.append((adapter, keys, fut))
        for adapter, keys, fut in tasks:
            slots = [staged[k] for k in keys]
            if not _wait(fut, adapter.spec.timeout_s - (time.monotonic() - started)):
                self._count(timeouts=1, failed_loads=len(keys))
                self._failed(adapter, "timeout", keys)
                adapter.count(load_timeouts=1)
                log.warning("L2 %s: load of %d keys timed out", adapter.name, len(keys))
                fut.add_done_callback(partial(_abort_late, self.l1, slots))
                self._release_loading(keys)
                continue
            ok = results(fut, len(keys))
            self._admit(req, [s for s, good in zip(slots, ok, strict=True) if good])
            bad = [s for s, good in zip(slots, ok, strict=True) if not good]
            self._count(failed_loads=len(bad))
            by_reason: dict[str, list[ObjectKey]] = defaultdict(list)
            for slot, good in zip(slots, ok, strict=True):
                why = reason(good)
                if why is not None:  # not_found, corrupt (removed from L2) or error
                    by_reason[why].append(slot.key)
            for why, failed_keys in by_reason.items():
                self._failed(adapter, why, failed_keys)
            self.l1.abort(bad)
            self._release_loading(keys)

    def _admit(self, req: _Request, slots: list[Slot]) -> None:
        if not slots:
            return
        committed = self.l1.commit(slots, temporary=not self.retain, announce=False)
        keys = [s.key for s, ok in zip(slots, committed, strict=True) if ok]
        self._count(loaded_objects=len(keys))
        self._lock_resident(req, keys)

    def _finish(self, req: _Request, limit: int) -> int:
        """Hit = rows fully locked within ``limit``; return the readers' locks past it."""
        hit = self._first_row_with(
            req, {k for row in req.rows for k in row if k not in req.locked}, limit
        )
        if hit < len(req.rows):
            self._count(truncated=1)
        extra = [k for row in req.rows[hit:] for k in row if k in req.locked]
        by_owner: dict[Owner, list[ObjectKey]] = defaultdict(list)
        for key in extra:
            by_owner[req.owner_of(key)].append(key)
        for owner, keys in by_owner.items():
            self.l1.unlock(keys, owner, req.readers)
        req.locked.difference_update(extra)
        return hit

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _first_row_with(req: _Request, bad: set[ObjectKey], limit: int) -> int:
        for i, row in enumerate(req.rows[:limit]):
            if any(k in bad for k in row):
                return i
        return limit

    def _abort(self, staged: dict[ObjectKey, Slot]) -> None:
        self.l1.abort(list(staged.values()))
        self._release_loading(list(staged))

    def _release_loading(self, keys: Sequence[ObjectKey]) -> None:
        with self._lock:
            for key in keys:
                event = self._loading.pop(key, None)
                if event is not None:
                    event.set()

    def _failed(self, adapter: ManagedAdapter, reason: str, keys: Sequence[ObjectKey]) -> None:
        if adapter.bus.enabled:
            adapter.bus.publish(ev.L2PrefetchFailed(reason=reason, key_count=len(keys),
                                                    model_name=keys[0].model_name,
                                                    l2_name=adapter.name))  # fmt: skip

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                self.counters[name] += d

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"policy": "retain" if self.retain else "default", "queued": self._queued,
                    **self.counters}  # fmt: skip

    def close(self) -> None:
        """Finish queued and running requests (each bounded by its deadlines), then stop."""
        self._pool.shutdown(wait=True)


def _wait(fut: Future, timeout: float) -> bool:
    """Wait for ``fut`` up to ``timeout`` seconds; False when it is still running."""
    try:
        fut.exception(timeout=max(0.0, timeout))
    except FutureTimeout:
        return False
    except Exception:  # noqa: BLE001 - failed or cancelled: done, outcome() reports all False
        return True
    return True


def _unpin(adapter: ManagedAdapter, keys: list[ObjectKey], fut: Future) -> None:
    adapter.tracker.unpin(keys)


def _abort_late(l1: L1Manager, slots: list[Slot], fut: Future) -> None:
    """A load that missed its deadline finished: only now may its reservations go."""
    l1.abort(slots)
