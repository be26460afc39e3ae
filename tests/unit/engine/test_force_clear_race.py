"""Forced clears racing stores and retrieves never serve wrong bytes (issue 10, fault 3).

Four workers store, look up and retrieve through the real engine on their own threads (as
with ``--max-workers 4``) while another thread force-clears L1 every 2 ms.  Every retrieve
that reports success must have copied exactly the bytes stored under its tokens; before the
fix, a forced clear freed memory a copy still read (or a writer still filled) and the next
store reused it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import C, key, register

from kvhive.engine.engine import CacheEngine
from kvhive.errors import TransferFailed
from support.shm import KVGeometry, ShmKV, make_shm_kv

GEOMETRY = KVGeometry(heads=8, head_size=64, layers=8)  # 512 KiB chunk objects
WORKERS = 4
SEQS = 4  # token lists per worker, 2 chunks (4 blocks) each
SRC = [list(range(1 + 4 * j, 5 + 4 * j)) for j in range(SEQS)]  # blocks 1..16: sources
DST = list(range(17, 21))  # blocks 17..20: where retrieves land
RUN_S = 3.0


@pytest.fixture
def kvs() -> Iterator[list[ShmKV]]:
    rng = np.random.default_rng(11)
    made = [make_shm_kv(rng, prefix="kvhive_race_", geometry=GEOMETRY) for _ in range(WORKERS)]
    yield made
    for kv in made:
        kv.destroy()


@pytest.fixture
def fine_switching() -> Iterator[None]:
    """Switch threads every 50 µs so the copies and clears interleave densely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = self.failed = self.wrong = self.misses = 0
        self.errors: list[BaseException] = []

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)


def worker(eng: CacheEngine, i: int, kv: ShmKV, stop: threading.Event, tally: Tally) -> None:
    iid = 100 + i
    seqs = [list(range(1 + (i * SEQS + j) * 10_000, 1 + (i * SEQS + j) * 10_000 + 2 * C))
            for j in range(SEQS)]  # fmt: skip
    expected = [kv.token_rows(src).copy() for src in SRC]  # sources are never written
    n = 0
    try:
        while not stop.is_set():
            j, n = n % SEQS, n + 1
            tokens, rid = seqs[j], f"w{i}-{n}"
            eng.transfers.store(key(tokens, 0, 2 * C, rid=rid), iid, [SRC[j]], b"")
            eng.lookups.lookup(key(tokens, 0, 2 * C, rid=rid, worker=None), 1)
            hits = eng.lookups.query_prefetch_status(rid) or 0
            if hits:
                dst = DST[: 2 * hits]
                try:
                    eng.transfers.retrieve(key(tokens, 0, hits * C, rid=rid), iid, [dst], b"", 0)
                except TransferFailed:  # the clear won: a miss, never wrong bytes
                    tally.add(failed=1)
                else:
                    same = np.array_equal(kv.token_rows(dst), expected[j][:, : hits * C])
                    tally.add(ok=1, wrong=0 if same else 1)
            else:
                tally.add(misses=1)
            eng.lookups.end_session(rid)
    except BaseException as exc:  # noqa: BLE001 - reported by the test thread
        tally.errors.append(exc)


def test_forced_clears_racing_copies_never_serve_wrong_bytes(
    engine: CacheEngine, kvs: list[ShmKV], fine_switching: None
) -> None:
    for i, kv in enumerate(kvs):
        register(engine, kv, 100 + i)
    stop = threading.Event()
    tally = Tally()
    threads = [
        threading.Thread(target=worker, args=(engine, i, kv, stop, tally))
        for i, kv in enumerate(kvs)
    ]
    for t in threads:
        t.start()
    clears = 0
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        engine.clear(force=True)
        clears += 1
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(30)
    assert not tally.errors, tally.errors
    assert tally.ok > 50 and tally.failed + tally.misses > 0 and clears > 100
    assert tally.wrong == 0, f"{tally.wrong} of {tally.ok} successful retrieves had wrong bytes"
    # Every copy and writer is done: nothing doomed is left, the accounting is exact.
    engine.clear(force=True)
    st = engine.l1.stats()
    assert (st.objects, st.doomed_objects, st.used_bytes, st.healthy) == (0, 0, 0, True)
