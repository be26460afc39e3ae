"""A policy that tracks nothing and never proposes victims.

Meant for buffer-only L1 use; with it, an allocation failure drops the store (counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from kvhive.keys import ObjectKey
from kvhive.storage.eviction.base import Evictable, EvictionPolicy


class NoopPolicy(EvictionPolicy):
    name = "noop"
    __slots__ = ()

    def on_created(self, keys: Sequence[ObjectKey]) -> None:
        pass

    def on_touched(self, keys: Sequence[ObjectKey]) -> None:
        pass

    def on_removed(self, keys: Iterable[ObjectKey]) -> None:
        pass

    def victims(self, evictable: Evictable) -> Iterator[ObjectKey]:
        return iter(())

    def __len__(self) -> int:
        return 0
