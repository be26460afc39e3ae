"""The eviction-policy plug point: one small interface, byte accounting elsewhere.

A policy only orders keys by value; the tier that owns it (``L1Manager``, later an L2
eviction controller) decides how many bytes to free and removes the objects itself.

Batch rule shared by the ordered policies: a batch of keys is applied back to front, so the
first key of a request ends up the most recent and the last key the least recent.  Tail
chunks therefore leave before head chunks and prefix hits survive longest.

Contracts:

* Not thread-safe: the owner serialises all calls (L1 does so under its mutex).
* ``victims`` and ``salt_buckets`` return live iterators over the policy's state: the caller
  collects what it needs, stops iterating, and only then removes objects (``on_removed``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

from kvhive.keys import ObjectKey

Evictable = Callable[[ObjectKey], bool]


class EvictionPolicy(ABC):
    """Orders tracked keys from least to most valuable."""

    name: ClassVar[str]
    __slots__ = ()

    @abstractmethod
    def on_created(self, keys: Sequence[ObjectKey]) -> None:
        """Keys became resident (or were re-created): track them as most recent."""

    @abstractmethod
    def on_touched(self, keys: Sequence[ObjectKey]) -> None:
        """Keys were used; untracked keys are ignored."""

    @abstractmethod
    def on_removed(self, keys: Iterable[ObjectKey]) -> None:
        """Keys are gone; untracked keys are ignored."""

    @abstractmethod
    def victims(self, evictable: Evictable) -> Iterator[ObjectKey]:
        """Tracked keys accepted by ``evictable``, least valuable first (lazy)."""

    def salt_buckets(self) -> Mapping[str, Iterable[ObjectKey]] | None:
        """Per-cache_salt key orders (least valuable first), or None without isolation."""
        return None

    @abstractmethod
    def __len__(self) -> int:
        """Number of tracked keys."""
