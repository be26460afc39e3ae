"""What a worker does to its own shared memory cannot hurt the server or others (issue 10).

Fault 1: a worker truncates its ``cpu_shm`` segment after registering it; its next store and
retrieve fail (TransferFailed: the op's soft value on the wire) instead of killing the
server with SIGBUS, and other workers keep being served byte-exact.
Fault 7: the segments of SIGKILLed workers are unlinked when the reaper drops them; a live
worker's, and files kvhive never recorded, are untouched.
Fault 6: a worker in another PID namespace cannot be proven dead, so neither the reaper nor
the start-up cleanup ever unlinks its segments.

Real CacheEngine, real L1, real worker processes (in another PID namespace via
``unshare --pid --fork``; CI runs as root and sets KVHIVE_REQUIRE_SERVICES=1, which turns a
missing ``unshare`` into a failure instead of a skip).
"""

from __future__ import annotations

import _posixshmem
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import GEOMETRY, C, key, register
from pidns import SegmentWorker, cleaned_up, invisible_pid, unshare_argv

from kvhive.engine.transfers import RetrieveResult, StoreResult
from kvhive.errors import TransferFailed
from kvhive.transfer.shm import cleanup_stale_segments
from support.descriptors import cpu_shm_descriptor
from support.shm import ShmSegment

TOKENS = list(range(1, 4 * C + 1))
OTHER = list(range(5000, 5000 + 4 * C))
BLOCKS_A = list(range(1, 9))
BLOCKS_B = list(range(10, 18))

# A worker process: creates one segment per layer in the vLLM-CPU layout, named like the
# lmcache client does (lmcache_kv_<its pid>_<n>), keeps them mapped, never unlinks them.
# With a pid argument it is a PID namespace's init: the worker it forks gets that pid.
WORKER = """
import json, mmap, os, subprocess, sys, time, _posixshmem
if len(sys.argv) > 3:
    open("/proc/sys/kernel/ns_last_pid", "w").write(str(int(sys.argv[3]) - 1))
    sys.exit(subprocess.call([sys.executable, "-c", CODE, *sys.argv[1:3]]))
layers, nbytes = int(sys.argv[1]), int(sys.argv[2])
names, maps = [], []
for i in range(layers):
    name = "lmcache_kv_%d_%d" % (os.getpid(), i)
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    os.ftruncate(fd, nbytes)
    m = mmap.mmap(fd, nbytes)
    m[:] = os.urandom(nbytes)
    maps.append(m)
    os.close(fd)
    names.append(name)
print(json.dumps({"pid": os.getpid(), "names": names}), flush=True)
time.sleep(600)
"""
WORKER_CODE = f"CODE = {WORKER!r}\n{WORKER}"  # the namespace's init runs CODE again


class Worker(SegmentWorker):
    """A real worker process holding ``lmcache_kv_<pid>_<n>`` segments (see WORKER)."""

    def __init__(self, *, ns_pid: int = 0, unshare: list[str] | None = None) -> None:
        nbytes = GEOMETRY.layer_nbytes
        argv = [sys.executable, "-c", WORKER_CODE, str(GEOMETRY.layers), str(nbytes)]
        super().__init__(argv, ns_pid=ns_pid, unshare=unshare)

    def descriptors(self) -> list:
        shape = GEOMETRY.layer_shape
        return [cpu_shm_descriptor("/" + n, "float16", shape) for n in self.names]


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    yield from cleaned_up([])


def register_worker(eng, w: Worker, iid: int) -> None:
    eng.transfers.register_kv_cache(iid, w.descriptors(), "m", 1, "vllm", {"kv_layout": "HND"}, [])


def truncate(names: list[str], nbytes: int) -> None:
    for n in names:
        fd = _posixshmem.shm_open("/" + n, os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)


def lookup_hits(eng, tokens, rid):
    eng.lookups.lookup(key(tokens, 0, len(tokens), rid=rid, worker=None), 1)
    return eng.lookups.query_prefetch_status(rid)


# -- fault 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, GEOMETRY.layer_nbytes // 3])
def test_a_truncated_segment_fails_only_that_workers_requests(engine, make_kv, nbytes) -> None:
    a, b = make_kv(), make_kv()
    register(engine, a, 1)
    register(engine, b, 2)
    assert engine.transfers.store(key(TOKENS, 0, 4 * C), 1, [BLOCKS_A], b"") == StoreResult(4, 0)
    stored = a.token_rows(BLOCKS_A).copy()  # before its pages go away
    truncate(a.names, nbytes)

    with pytest.raises(TransferFailed, match="truncated or shrank"):
        engine.transfers.store(key(OTHER, 0, 4 * C), 1, [list(range(13, 21))], b"")
    assert engine.l1.stats().staging_objects == 0  # the failed store's reservations went back
    assert lookup_hits(engine, OTHER, "q0") == 0  # and nothing of it became visible
    assert lookup_hits(engine, TOKENS, "q1") == 4
    with pytest.raises(TransferFailed, match="truncated or shrank"):
        engine.transfers.retrieve(key(TOKENS, 0, 4 * C, rid="q1"), 1, [BLOCKS_B], b"", 0)
    assert engine.l1.stats().read_locked_objects == 0  # the failed retrieve let go
    with pytest.raises(TransferFailed):
        engine.registry.get(1).mapping.checksums(BLOCKS_A, 2)

    # The other worker is served as before, byte-exact, from the chunks stored earlier.
    assert lookup_hits(engine, TOKENS, "q2") == 4
    got = engine.transfers.retrieve(key(TOKENS, 0, 4 * C, rid="q2"), 2, [BLOCKS_B], b"", 0)
    assert got == RetrieveResult(4)
    np.testing.assert_array_equal(b.token_rows(BLOCKS_B), stored)
    assert engine.transfers.store(key(OTHER, 0, 4 * C), 2, [BLOCKS_B], b"") == StoreResult(4, 0)
    engine.transfers.unregister_kv_cache(1)  # and the truncated one unregisters cleanly


# -- fault 7 ---------------------------------------------------------------------------------


def test_the_reaper_frees_killed_workers_segments_only(engine, clock, workers) -> None:
    workers.extend(Worker() for _ in range(4))
    *doomed, live = workers
    never_recorded = ShmSegment(4096, name=f"lmcache_kv_{doomed[0].pid}_77")  # not registered
    try:
        for i, w in enumerate(workers):
            register_worker(engine, w, 100 + i)
            engine.ping(100 + i)
        for w in doomed:
            w.kill()
        assert all(all(w.exists()) for w in workers)  # nothing frees them by itself
        clock.now += 121
        engine.ping(100 + len(doomed))  # the live worker keeps pinging
        reaped = sorted(i.instance_id for i in engine.registry.reap())
        assert reaped == [100 + i for i in range(len(doomed))]
        for w in doomed:
            assert w.exists() == [False] * len(w.names)
        assert all(live.exists())
        assert os.path.exists(f"/dev/shm/{never_recorded.name}")
        assert engine.registry.info()["segments_unlinked"] == len(doomed) * GEOMETRY.layers
        # The live worker is still served.
        iid = 100 + len(doomed)
        assert engine.transfers.store(key(TOKENS, 0, 2 * C), iid, [BLOCKS_A[:4]], b"") == (
            StoreResult(2, 0)
        )
        # Dropped while alive (unregistered, or reaped while stopped): watched, and freed
        # by the reaper's tick once it dies.
        engine.transfers.unregister_kv_cache(iid)
        assert all(live.exists())
        assert engine.registry.segments.watched == GEOMETRY.layers
        live.kill()
        assert sorted(engine.registry.segments.poll()) == sorted(live.names)
    finally:
        never_recorded.destroy()


# -- fault 6 ---------------------------------------------------------------------------------


def test_a_worker_in_another_pid_namespace_is_never_unlinked(engine, clock, workers) -> None:
    unshare = unshare_argv()
    hidden = Worker(ns_pid=invisible_pid(), unshare=unshare)
    workers.append(hidden)
    assert not os.path.exists(f"/proc/{hidden.pid}")  # its pid means nothing here
    # Its pid collides with a live process here that does not map the segments.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        colliding = Worker(ns_pid=bystander.pid, unshare=unshare)
        workers.append(colliding)
        assert colliding.pid == bystander.pid
        for i, w in enumerate((hidden, colliding)):
            register_worker(engine, w, 200 + i)
            engine.ping(200 + i)
        # The start-up cleanup of a kvhive (re)started now must not delete them.
        assert cleanup_stale_segments() == []
        assert all(hidden.exists())
        for w in (hidden, colliding):
            w.kill()
        bystander.kill()
        bystander.wait()
        clock.now += 121
        assert len(engine.registry.reap()) == 2
        engine.registry.segments.poll()
        # Dead or not, kvhive could never prove who they belonged to: left alone.
        assert all(hidden.exists())
        assert all(colliding.exists())
        assert engine.registry.info()["segments_unlinked"] == 0
    finally:
        if bystander.poll() is None:
            bystander.kill()
        bystander.wait()
