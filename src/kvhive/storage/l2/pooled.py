"""PooledAdapter: turns a synchronous :class:`ObjectStore` into an :class:`L2Adapter`.

Every key of a store or load batch is one job on a thread pool of ``workers`` threads (the
stores' I/O releases the GIL, so jobs overlap); a lookup or delete batch is one job.  The
integrity trailer, bound to the object's key, is added and checked here (``integrity.py``)
for stores that frame.  A corrupt object (damaged, or another key's object under this key's
name) is a miss: it is counted, logged and deleted, so later lookups stop finding it.
Errors are counted per kind and never escape a job; each failed key's outcome says which
kind it was (``futures.MISSING``, ``CORRUPT``, ``ERROR``).

Shutdown has a deadline (``close_deadline_s``): queued jobs are cancelled, running ones get
until the deadline to finish (they may still write L1 buffers, so L1 must outlive them).  A
job still running then is logged and abandoned: its worker is a daemon thread that neither
``close`` nor interpreter exit waits for, and the store is left open under it (closing a
store under a running call could crash a native one; process exit reclaims it).  An abandoned
job that later writes a buffer is memory safe: the L1 arena defers its unmapping while views
of it live.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from kvhive.errors import CorruptObject, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.futures import CORRUPT, ERROR, MISSING, Outcome, gather
from kvhive.storage.l2.integrity import (
    TRAILER_BYTES,
    Integrity,
    PieceHasher,
    key_digest,
    make_trailer,
    verify,
)

log = logging.getLogger(__name__)

CLOSE_DEADLINE_S = 10.0
STREAM_CHECK_MIN = 4 << 20
"""Objects from this size are checked piece by piece on a second thread while they are read
(``integrity.PieceHasher``); smaller ones after the read, on the worker."""
"""Default seconds ``close`` waits for running jobs before abandoning them."""


class PooledAdapter(L2Adapter):
    """An :class:`ObjectStore` run on a worker pool, with integrity framing."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        workers: int,
        integrity: Integrity,
        name: str = "",
        close_deadline_s: float = CLOSE_DEADLINE_S,
    ) -> None:
        self.store = store
        self.durable = store.durable
        self.name = name or type(store).__name__
        self._frame = store.frames and integrity == "checksum"
        self._check = store.frames
        self._close_deadline = close_deadline_s
        self._pool = WorkerPool(max(1, workers), name=f"l2-{self.name}")
        self._lock = threading.Lock()
        self.counters = {"errors": 0, "corrupt": 0, "missing": 0}

    # -- contract ------------------------------------------------------------------------

    def submit_store(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Future:
        return self._per_key(self._put, keys, buffers)

    def submit_load(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Future:
        return self._per_key(self._get, keys, buffers)

    def submit_lookup(self, keys: Sequence[ObjectKey]) -> Future:
        return self._pool.submit(self._guard_batch, self.store.exists_many, list(keys))

    def submit_delete(self, keys: Sequence[ObjectKey]) -> Future:
        return self._pool.submit(self._guard_batch, self._delete_many, list(keys))

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        return self.store.scan()

    @property
    def capacity_bytes(self) -> int:
        return int(self.store.capacity_bytes)

    def footprint(self, nbytes: int) -> int:
        return self.store.footprint(nbytes) + (TRAILER_BYTES if self._frame else 0)

    def status(self) -> dict[str, Any]:
        with self._lock:
            counters = dict(self.counters)
        return {
            **counters,
            "integrity": "checksum" if self._frame else "raw",
            **self.store.status(),
        }

    def close(self) -> None:
        """Cancel queued jobs, wait up to ``close_deadline_s`` for running ones, close the
        store; with jobs still running, log and abandon them (module docstring)."""
        stuck = self._pool.shutdown(self._close_deadline)
        if stuck:
            log.error(
                "L2 %s: %d job(s) still running after %.1f s; abandoning them and leaving "
                "the store open", self.name, stuck, self._close_deadline,
            )  # fmt: skip
            return
        self.store.close()

    # -- jobs (pool threads) ---------------------------------------------------------------

    def _per_key(
        self,
        job: Callable[[ObjectKey, memoryview], Outcome],
        keys: Sequence[ObjectKey],
        buffers: Sequence[memoryview],
    ) -> Future:
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        parts = [
            (self._pool.submit(self._guard_key, job, key, buf), (i,))
            for i, (key, buf) in enumerate(zip(keys, buffers, strict=True))
        ]
        return gather([(_as_list(f), pos) for f, pos in parts], len(keys))

    def _guard_key(
        self, job: Callable[[ObjectKey, memoryview], Outcome], key: ObjectKey, buf: memoryview
    ) -> Outcome:
        try:
            return job(key, buf)
        except ObjectMissing:
            self._count("missing")
            return MISSING
        except CorruptObject as exc:
            self._count("corrupt")
            log.warning("L2 %s: corrupt object %s (%s); removing it", self.name, key, exc)
            self._quietly_delete(key)
            return CORRUPT
        except Exception as exc:  # noqa: BLE001 - task boundary: one key fails, counted, logged
            self._count("errors")
            log.warning("L2 %s: %s on %s failed: %s", self.name, job.__name__, key, exc)
            return ERROR

    def _guard_batch(
        self, fn: Callable[[list[ObjectKey]], list[bool]], keys: list[ObjectKey]
    ) -> list[bool]:
        try:
            return fn(keys)
        except Exception as exc:  # noqa: BLE001 - task boundary: the whole batch fails, counted
            self._count("errors")
            log.warning("L2 %s: %s of %d keys failed: %s", self.name, fn.__name__, len(keys), exc)
            return [False] * len(keys)

    def _put(self, key: ObjectKey, buf: memoryview) -> Outcome:
        parts = [buf, memoryview(make_trailer(buf, key_digest(key)))] if self._frame else [buf]
        self.store.put(key, parts)
        return True

    def _get(self, key: ObjectKey, buf: memoryview) -> Outcome:
        if not self._check:
            self.store.get(key, [buf])
            return True
        tail = memoryview(bytearray(TRAILER_BYTES))
        if buf.nbytes < STREAM_CHECK_MIN or not self._frame:
            # small, or a raw tier (objects rarely carry a trailer: hashing ahead is waste)
            total = self.store.get(key, [buf, tail])
            verify(buf, total, tail, key_digest(key))
            return True
        hasher = PieceHasher(buf)  # checks each piece while the store reads the next
        try:
            total = self.store.get_streamed(key, [buf, tail], hasher.landed)
        except BaseException:
            hasher.abandon()
            raise
        digest = key_digest(key)
        verify(buf, total, tail, digest, hasher.digest(digest))
        return True

    def _delete_many(self, keys: list[ObjectKey]) -> list[bool]:
        return [self.store.delete(key) for key in keys]

    def _quietly_delete(self, key: ObjectKey) -> None:
        try:
            self.store.delete(key)
        except Exception as exc:  # noqa: BLE001 - best effort: the object stays a counted miss
            log.warning("L2 %s: could not remove corrupt %s: %s", self.name, key, exc)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1


_Job = tuple[Future, Callable[..., Any], tuple[Any, ...]]


class WorkerPool:
    """``workers`` daemon threads serving one FIFO of jobs, with a bounded shutdown.

    Like ``ThreadPoolExecutor`` minus its exit-time join of every worker, so a job stuck in
    a backend cannot hang shutdown or interpreter exit.  ``submit`` is thread-safe and
    raises RuntimeError after ``shutdown``.
    """

    __slots__ = ("_jobs", "_threads", "_lock", "_closed")

    def __init__(self, workers: int, *, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:  # no job slips in behind shutdown's cancellation sweep
            if self._closed:
                raise RuntimeError("L2 worker pool is shut down")
            self._jobs.put((fut, fn, args))
        return fut

    def shutdown(self, deadline_s: float) -> int:
        """Cancel queued jobs, let running ones finish for up to ``deadline_s`` seconds;
        returns how many workers are still busy (abandoned).  Idempotent."""
        with self._lock:
            self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)  # one stop mark per worker, after its current job
        end = time.monotonic() + deadline_s
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return sum(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - task boundary: the future carries it
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            del job, fut, args  # drop buffer references before waiting for the next job


def _as_list(fut: Future) -> Future:
    """Wrap a per-key ``Future[Outcome]`` as a ``Future[list[Outcome]]`` (a job that
    raised or was cancelled is ERROR)."""
    out: Future = Future()

    def done(f: Future) -> None:
        failed = f.cancelled() or f.exception() is not None
        out.set_result([ERROR if failed else f.result()])

    fut.add_done_callback(done)
    return out
