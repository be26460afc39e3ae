"""PooledAdapter: turns a synchronous :class:`ObjectStore` into an :class:`L2Adapter`.

Every key of a store or load batch is one job on a thread pool of ``workers`` threads (the
stores' I/O releases the GIL, so jobs overlap); a lookup or delete batch is one job.  The
integrity trailer is added and checked here (``integrity.py``) for stores that frame.  A
corrupt object is a miss: it is counted, logged and deleted, so later lookups stop finding
it.  Errors are counted per kind and never escape a job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kvhive.errors import CorruptObject, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.futures import gather
from kvhive.storage.l2.integrity import TRAILER_BYTES, Integrity, make_trailer, verify

log = logging.getLogger(__name__)


class PooledAdapter(L2Adapter):
    """An :class:`ObjectStore` run on a worker pool, with integrity framing."""

    def __init__(
        self, store: ObjectStore, *, workers: int, integrity: Integrity, name: str = ""
    ) -> None:
        self.store = store
        self.durable = store.durable
        self.name = name or type(store).__name__
        self._frame = store.frames and integrity == "checksum"
        self._check = store.frames
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"l2-{self.name}")
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
        # Running jobs may still touch L1 buffers: wait for them before L1 can go away.
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    # -- jobs (pool threads) ---------------------------------------------------------------

    def _per_key(
        self,
        job: Callable[[ObjectKey, memoryview], bool],
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
        self, job: Callable[[ObjectKey, memoryview], bool], key: ObjectKey, buf: memoryview
    ) -> bool:
        try:
            return job(key, buf)
        except ObjectMissing:
            self._count("missing")
        except CorruptObject as exc:
            self._count("corrupt")
            log.warning("L2 %s: corrupt object %s (%s); removing it", self.name, key, exc)
            self._quietly_delete(key)
        except Exception as exc:  # task boundary: one key fails, counted and logged
            self._count("errors")
            log.warning("L2 %s: %s on %s failed: %s", self.name, job.__name__, key, exc)
        return False

    def _guard_batch(
        self, fn: Callable[[list[ObjectKey]], list[bool]], keys: list[ObjectKey]
    ) -> list[bool]:
        try:
            return fn(keys)
        except Exception as exc:  # task boundary: the whole batch fails, counted
            self._count("errors")
            log.warning("L2 %s: %s of %d keys failed: %s", self.name, fn.__name__, len(keys), exc)
            return [False] * len(keys)

    def _put(self, key: ObjectKey, buf: memoryview) -> bool:
        parts = [buf, memoryview(make_trailer(buf))] if self._frame else [buf]
        self.store.put(key, parts)
        return True

    def _get(self, key: ObjectKey, buf: memoryview) -> bool:
        if not self._check:
            self.store.get(key, [buf])
            return True
        tail = memoryview(bytearray(TRAILER_BYTES))
        total = self.store.get(key, [buf, tail])
        verify(buf, total, tail)
        return True

    def _delete_many(self, keys: list[ObjectKey]) -> list[bool]:
        return [self.store.delete(key) for key in keys]

    def _quietly_delete(self, key: ObjectKey) -> None:
        try:
            self.store.delete(key)
        except Exception as exc:  # best effort: the object stays a counted miss
            log.warning("L2 %s: could not remove corrupt %s: %s", self.name, key, exc)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1


def _as_list(fut: Future) -> Future:
    """Wrap a per-key ``Future[bool]`` as a ``Future[list[bool]]``."""
    out: Future = Future()

    def done(f: Future) -> None:
        ok = not f.cancelled() and f.exception() is None and bool(f.result())
        out.set_result([ok])

    fut.add_done_callback(done)
    return out
