"""One LRU order per cache_salt, with a global order across them.

Each bucket maps key -> stamp, where stamps come from one counter shared by all buckets, so
each bucket is ordered by stamp and ``victims`` merges the buckets into the global
least-recent-first order lazily (a heap over the bucket heads).  Empty buckets are removed.
How a tier turns buckets into quota enforcement is the tier's business (``L1Manager``).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

from kvhive.keys import ObjectKey
from kvhive.storage.eviction.base import Evictable, EvictionPolicy


class IsolatedLRUPolicy(EvictionPolicy):
    """Per-salt LRU; batch rule as in LRU (see base)."""

    name = "IsolatedLRU"
    __slots__ = ("_buckets", "_clock", "_count")

    def __init__(self) -> None:
        self._buckets: dict[str, OrderedDict[ObjectKey, int]] = {}
        self._clock = 0  # logical time: bigger stamp = more recent
        self._count = 0

    def on_created(self, keys: Sequence[ObjectKey]) -> None:
        for key in reversed(keys):
            bucket = self._buckets.get(key.cache_salt)
            if bucket is None:
                bucket = self._buckets[key.cache_salt] = OrderedDict()
            if key not in bucket:
                self._count += 1
            self._stamp(bucket, key)

    def on_touched(self, keys: Sequence[ObjectKey]) -> None:
        for key in reversed(keys):
            bucket = self._buckets.get(key.cache_salt)
            if bucket is not None and key in bucket:
                self._stamp(bucket, key)

    def on_removed(self, keys: Iterable[ObjectKey]) -> None:
        for key in keys:
            bucket = self._buckets.get(key.cache_salt)
            if bucket is not None and bucket.pop(key, None) is not None:
                self._count -= 1
                if not bucket:
                    del self._buckets[key.cache_salt]

    def victims(self, evictable: Evictable) -> Iterator[ObjectKey]:
        # Stamps are unique, so the merge never compares two ObjectKeys.
        heads = (((stamp, key) for key, stamp in b.items()) for b in self._buckets.values())
        return (key for _, key in heapq.merge(*heads) if evictable(key))

    def salt_buckets(self) -> Mapping[str, Iterable[ObjectKey]]:
        """Read-only live view: salt -> its keys, least recent first."""
        return MappingProxyType(self._buckets)

    def __len__(self) -> int:
        return self._count

    def _stamp(self, bucket: OrderedDict[ObjectKey, int], key: ObjectKey) -> None:
        self._clock += 1
        bucket[key] = self._clock
        bucket.move_to_end(key)
