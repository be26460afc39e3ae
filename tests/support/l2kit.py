"""L2 adapter test kit shared by ``tests/l2`` and ``tests/mooncake`` (two folders with their own
conftest, so the kit lives here and is imported by name): keys, payloads, whole-batch store and
load, the adapter opener behind both folders' ``open_adapter`` fixture, and the generic
concurrency check."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from kvhive.config.l2_adapters import parse_adapter
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.registry import build_adapter

WAIT_S = 30.0

Opener = Callable[..., ManagedAdapter]


def keys_for(
    n: int, *, salt: str = "", model: str = "org/model", start: int = 0
) -> list[ObjectKey]:
    """``n`` fresh keys (random hash prefix, index ``start..``) of rank 0 of a 1-rank model."""
    rank = pack_kv_rank(1, 0)
    return [ObjectKey(os.urandom(4) + i.to_bytes(4, "big"), model, rank, 0, salt)
            for i in range(start, start + n)]  # fmt: skip


def aligned_copy(data: np.ndarray, align: int = 4096) -> np.ndarray:
    """A copy of ``data`` whose first byte sits on an ``align`` boundary (for O_DIRECT)."""
    raw = np.empty(data.nbytes + align, dtype=np.uint8)
    off = -raw.ctypes.data % align
    out = raw[off : off + data.nbytes]
    out[:] = data
    return out


def payloads(n: int, nbytes: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` page-aligned random payloads of ``nbytes`` (deterministic per ``seed``)."""
    rng = np.random.default_rng(seed)
    return [aligned_copy(rng.integers(0, 256, nbytes, dtype=np.uint8)) for _ in range(n)]


def done(fut: Any, timeout: float = WAIT_S) -> list[bool]:
    return list(fut.result(timeout=timeout))


def store_all(adapter: ManagedAdapter, keys: list[ObjectKey], data: list[np.ndarray]) -> list[bool]:
    return done(adapter.store(keys, [memoryview(d) for d in data]))


def load_all(
    adapter: ManagedAdapter, keys: list[ObjectKey], nbytes: int
) -> tuple[list[bool], list[np.ndarray]]:
    """Load ``keys`` into fresh aligned buffers of ``nbytes``: (per-key success, buffers)."""
    bufs = [aligned_copy(np.zeros(nbytes, dtype=np.uint8)) for _ in keys]
    return done(adapter.load(keys, [memoryview(b) for b in bufs])), bufs


def open_adapters() -> Iterator[Opener]:
    """Body of an ``open_adapter`` fixture: yields ``open_adapter(json, index=0)`` making a
    ManagedAdapter from adapter JSON; every adapter it made is closed at teardown (closing is
    idempotent, so a test may close its own first)."""
    opened: list[ManagedAdapter] = []

    def make(raw: dict[str, Any], index: int = 0) -> ManagedAdapter:
        spec = parse_adapter(index, json.loads(json.dumps(raw)))
        adapter = ManagedAdapter(spec, build_adapter(spec))
        opened.append(adapter)
        return adapter

    yield make
    for adapter in opened:
        adapter.close()


def hammer_concurrently(adapter: ManagedAdapter, nbytes: int, workers: int = 6) -> list[str]:
    """``workers`` threads each store and load (twice) 3 keys of their own plus 2 keys all of
    them share, checking every byte; returns the failures (empty when all went right)."""
    errors: list[str] = []
    shared_keys, shared_data = keys_for(2), payloads(2, nbytes, seed=9)

    def worker(i: int) -> None:
        keys, data = keys_for(3), payloads(3, nbytes, seed=i)
        try:
            for _ in range(2):
                assert store_all(adapter, keys + shared_keys, data + shared_data) == [True] * 5
                ok, bufs = load_all(adapter, keys + shared_keys, nbytes)
                assert ok == [True] * 5
                assert all(
                    np.array_equal(a, b) for a, b in zip(bufs, data + shared_data, strict=True)
                )
        except AssertionError as exc:
            errors.append(f"worker {i}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors.extend(f"worker thread {t.name} still running" for t in threads if t.is_alive())
    return errors
