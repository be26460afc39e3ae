"""A third-party ``plugin`` adapter: an ObjectStore kept in a dict (kvhive adds the rest)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvhive.errors import ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2 import ObjectStore


class DictStore(ObjectStore):
    def __init__(self, **params: object) -> None:
        self.params = params
        self._lock = threading.Lock()
        self._data: dict[ObjectKey, bytes] = {}

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        with self._lock:
            self._data[key] = b"".join(parts)

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        with self._lock:
            data = self._data.get(key)
        if data is None:
            raise ObjectMissing(str(key))
        pos = 0
        for part in parts:
            n = max(0, min(part.nbytes, len(data) - pos))
            part[:n] = data[pos : pos + n]
            pos += n
        return len(data)

    def exists(self, key: ObjectKey) -> bool:
        with self._lock:
            return key in self._data

    def delete(self, key: ObjectKey) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None
