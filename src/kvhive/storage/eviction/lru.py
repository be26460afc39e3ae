"""Least-recently-used order over one insertion-ordered map (batch rule: see base)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from kvhive.keys import ObjectKey
from kvhive.storage.eviction.base import Evictable, EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Oldest entry first; creating or touching moves keys to the recent end."""

    name = "LRU"
    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[ObjectKey, None] = OrderedDict()

    def on_created(self, keys: Sequence[ObjectKey]) -> None:
        order = self._order
        for key in reversed(keys):
            order[key] = None
            order.move_to_end(key)

    def on_touched(self, keys: Sequence[ObjectKey]) -> None:
        order = self._order
        for key in reversed(keys):
            if key in order:
                order.move_to_end(key)

    def on_removed(self, keys: Iterable[ObjectKey]) -> None:
        for key in keys:
            self._order.pop(key, None)

    def victims(self, evictable: Evictable) -> Iterator[ObjectKey]:
        return (key for key in self._order if evictable(key))

    def __len__(self) -> int:
        return len(self._order)
