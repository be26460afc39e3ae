"""PooledAdapter shutdown: a deadline for running jobs, queued jobs cancelled, stuck jobs
abandoned (logged) instead of hanging close()."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import pytest

from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.l2.base import ObjectStore
from kvhive.storage.l2.pooled import PooledAdapter

KEYS = [ObjectKey(i.to_bytes(8, "big"), "m", pack_kv_rank(1, 0), 0, "") for i in range(3)]


class StuckStore(ObjectStore):
    """Fault-injecting store: ``get`` blocks until ``release`` is set (a hung backend)."""

    frames = False

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        return None

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        self.entered.set()
        self.release.wait(30.0)
        return sum(p.nbytes for p in parts)

    def exists(self, key: ObjectKey) -> bool:
        return True

    def delete(self, key: ObjectKey) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def buffers(n: int) -> list[memoryview]:
    return [memoryview(bytearray(16)) for _ in range(n)]


def test_a_stuck_job_does_not_hang_close(caplog: pytest.LogCaptureFixture) -> None:
    store = StuckStore()
    adapter = PooledAdapter(store, workers=1, integrity="raw", name="stuck",
                            close_deadline_s=0.2)  # fmt: skip
    running = adapter.submit_load(KEYS[:1], buffers(1))
    assert store.entered.wait(5.0)
    queued = adapter.submit_load(KEYS[1:], buffers(2))  # waits behind the stuck one
    try:
        with caplog.at_level(logging.ERROR, logger="kvhive.storage.l2.pooled"):
            t0 = time.monotonic()
            adapter.close()
            assert time.monotonic() - t0 < 2.0
        assert "1 job(s) still running after 0.2 s" in caplog.text
        assert queued.result(timeout=1.0) == [False, False]  # cancelled, never ran
        assert not running.done()
        assert not store.closed  # left open under the stuck call
        with pytest.raises(RuntimeError):
            adapter.submit_lookup(KEYS)
        stuck = [t for t in threading.enumerate() if t.name.startswith("l2-stuck")]
        assert stuck and all(t.daemon for t in stuck)  # interpreter exit will not wait
    finally:
        store.release.set()
    assert running.result(timeout=5.0) == [True]  # the abandoned job still completes cleanly


def test_close_waits_for_running_jobs_within_the_deadline() -> None:
    store = StuckStore()
    adapter = PooledAdapter(store, workers=2, integrity="raw", name="slow",
                            close_deadline_s=10.0)  # fmt: skip
    fut = adapter.submit_load(KEYS[:1], buffers(1))
    assert store.entered.wait(5.0)
    threading.Timer(0.1, store.release.set).start()
    adapter.close()
    assert fut.result(timeout=0) == [True]  # finished before close returned
    assert store.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("l2-slow")]
