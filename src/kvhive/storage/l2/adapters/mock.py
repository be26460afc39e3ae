"""``mock``: an in-memory store with simulated bandwidth; capacity is enforced by kvhive.

JSON: ``max_size_gb`` (capacity, GiB, > 0), ``mock_bandwidth_gb`` (GiB/s, > 0).  Every put
and get sleeps ``bytes / bandwidth``.  A store that would exceed the capacity is refused and
counted (the reference skipped such keys yet reported success).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from kvhive.config.l2_adapters import MockAdapterConfig
from kvhive.errors import CorruptObject, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.pooled import PooledAdapter

GiB = 1 << 30


def copy_out(data: memoryview, parts: Sequence[memoryview]) -> int:
    """Copy ``data`` into ``parts`` in order (as far as it reaches); returns len(data)."""
    pos = 0
    for part in parts:
        n = min(part.nbytes, data.nbytes - pos)
        if n <= 0:
            break
        part[:n] = data[pos : pos + n]
        pos += n
    return data.nbytes


class MockStore(ObjectStore):
    """Objects in a dict; every transfer sleeps ``bytes / mock_bandwidth_gb`` (GiB/s)."""

    frames = False

    def __init__(self, mock_bandwidth_gb: float) -> None:
        self._bandwidth = mock_bandwidth_gb * GiB
        self._lock = threading.Lock()
        self._data: dict[ObjectKey, bytes] = {}

    def _delay(self, nbytes: int) -> None:
        time.sleep(nbytes / self._bandwidth)

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        data = b"".join(parts)
        self._delay(len(data))
        with self._lock:
            self._data[key] = data

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        with self._lock:
            data = self._data.get(key)
        if data is None:
            raise ObjectMissing(str(key))
        if len(data) != sum(p.nbytes for p in parts):
            raise CorruptObject(f"stored {len(data)} bytes")
        self._delay(len(data))
        return copy_out(memoryview(data), parts)

    def exists(self, key: ObjectKey) -> bool:
        with self._lock:
            return key in self._data

    def delete(self, key: ObjectKey) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"objects": len(self._data)}


def build(cfg: MockAdapterConfig) -> L2Adapter:
    """``mock``: the capacity (``max_size_gb``) is enforced by kvhive's tracker, not here."""
    store = MockStore(cfg.mock_bandwidth_gb)
    return PooledAdapter(store, workers=cfg.num_workers, integrity="raw", name=cfg.label)
