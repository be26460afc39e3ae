"""Reclaimer: how L1 finds memory — expired reservations, lazy growth, eviction.

Inline, for ``reserve`` (``allocate``): take free ranges; else reclaim expired reservations
(and doomed memory whose readers' locks expired); else grow a lazy arena; else evict
unlocked resident objects in policy order until the request fits (byte based: free what is
missing, again while fragmentation defeats it).  What is still missing is the caller's to
drop.

Background (``tick``, once per ``evict_interval`` from the manager's evictor thread):
reclaim expired reservations and unused doomed memory, enforce IsolatedLRU quotas (module
docstring of ``manager.py``), then when usage >= watermark evict ``eviction_ratio * used`` bytes (at
least one object).  Usage is ``allocated / size_bytes`` (configured, not the grown heap).

Not thread-safe: the owning ``L1Manager`` calls with its mutex ``_mu`` held.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.storage.eviction.base import EvictionPolicy
from kvhive.storage.l1.allocator import FreeListAllocator
from kvhive.storage.l1.arena import Arena
from kvhive.storage.l1.records import L1Params
from kvhive.storage.l1.table import ObjectTable
from kvhive.storage.quota import QuotaRegistry

log = logging.getLogger(__name__)


class Reclaimer:
    """Frees and finds L1 memory for an :class:`ObjectTable` (module docstring)."""

    def __init__(
        self,
        table: ObjectTable,
        arena: Arena,
        params: L1Params,
        *,
        policy: EvictionPolicy,
        quotas: QuotaRegistry | None,
        bus: EventBus,
    ) -> None:
        self._table = table
        self._alloc: FreeListAllocator = table.alloc
        self._arena = arena
        self._size = params.size_bytes
        self._watermark = params.watermark
        self._ratio = params.eviction_ratio
        self._policy = policy
        self._quotas = quotas
        self._bus = bus
        if policy.salt_buckets() is not None:
            log.warning("L1 %s: salts without a quota are evicted on every tick", policy.name)

    def allocate(self, phys: int, count: int, now: float) -> list[int]:
        """Up to ``count`` offsets of ``phys`` bytes: reclaim, grow, then evict inline."""
        alloc = self._alloc
        offsets = alloc.allocate_many(phys, count)
        if len(offsets) < count and self._table.reclaim_expired(now):
            offsets += alloc.allocate_many(phys, count - len(offsets))
        if len(offsets) < count and self._arena.grow((count - len(offsets)) * phys):
            alloc.extend(self._arena.heap_bytes)
            offsets += alloc.allocate_many(phys, count - len(offsets))
        while len(offsets) < count:
            # Byte based: free what is missing; loop again if fragmentation defeats it.
            missing = (count - len(offsets)) * phys
            victims = self._pick(self._policy.victims(self._table.evictable), missing)
            if not victims:
                break
            self._table.remove(victims, evicted=True)
            offsets += alloc.allocate_many(phys, count - len(offsets))
        return offsets

    def tick(self, now: float) -> int:
        """One background eviction pass (module docstring); returns objects evicted."""
        before = self._table.evicted_objects
        self._table.reclaim_expired(now)
        buckets = self._policy.salt_buckets()
        if buckets is not None:
            self._enforce_quotas(buckets)
        used = self._alloc.allocated_bytes
        triggered = bool(used and used >= self._watermark * self._size)
        if triggered:
            victims = self._pick(self._policy.victims(self._table.evictable), self._ratio * used)
            self._table.remove(victims, evicted=True)
        evicted = self._table.evicted_objects - before
        if self._bus.enabled:
            self._bus.publish(
                ev.L1EvictionTick(
                    usage=used / self._size,
                    watermark=self._watermark,
                    triggered=triggered or evicted > 0,
                    evicted=evicted,
                )
            )
        return evicted

    def _pick(self, candidates: Iterable[ObjectKey], target: float) -> list[ObjectKey]:
        """Take candidates in order until they hold >= ``target`` bytes (at least one)."""
        chosen: list[ObjectKey] = []
        total = 0
        for key in candidates:
            chosen.append(key)
            total += self._table.physical_bytes(key)
            if total >= target:
                break
        return chosen

    def _enforce_quotas(self, buckets: Mapping[str, Iterable[ObjectKey]]) -> None:
        """IsolatedLRU whitelist quotas against per-salt resident bytes."""
        chosen: list[ObjectKey] = []
        evictable = self._table.evictable
        for salt, keys in buckets.items():
            used = self._table.salt_bytes(salt)
            limit = (self._quotas.get(salt) if self._quotas else None) or 0
            if used <= 0 or used < self._watermark * limit:
                continue
            target = used if limit == 0 else self._ratio * used
            chosen += self._pick((k for k in keys if evictable(k)), target)
        self._table.remove(chosen, evicted=True)  # after iterating: removal edits the buckets
