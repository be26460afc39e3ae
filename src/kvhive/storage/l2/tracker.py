"""Per-adapter bookkeeping that kvhive keeps around every adapter (adapters do I/O only).

* sizes: stored bytes per key (the last store wins, so a size change is recorded — the
  reference keeps the first size forever) and their sum per ``cache_salt``;
* capacity: bytes reserved for stores in flight count as used, so parallel stores cannot
  overshoot ``capacity_bytes`` (0 = unbounded); a store that does not fit is refused;
* eviction order: an optional policy (``kvhive.storage.eviction``) fed with stored,
  accessed and removed keys;
* pins: keys a prefetch is loading, which eviction must not pick;
* usage scans: a durable backend is scanned at start-up (``add_existing``) so usage counts
  what a previous run left.  A scan that fails part-way leaves usage undercounted; it is
  counted with its error text in ``status()`` (``/status``, L2 adapters), not only logged.

Thread-safe: one lock; callers are the controllers' threads, adapter completion threads and
the L2 scan thread.  The lock is not held while a scan does its I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from kvhive.keys import ObjectKey
from kvhive.storage.eviction.base import EvictionPolicy


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes stored in one adapter (as kvhive knows them)."""

    used_bytes: int
    capacity_bytes: int  # 0 = unknown / unbounded
    bytes_by_salt: Mapping[str, int]
    objects: int

    @property
    def fraction(self) -> float:
        """used / capacity, or -1 when the capacity is unknown."""
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else -1.0


class Tracker:
    """Sizes, per-salt bytes, capacity reservations, eviction order and pins of one adapter."""

    def __init__(self, capacity_bytes: int = 0, policy: EvictionPolicy | None = None) -> None:
        self.capacity = capacity_bytes
        self.policy = policy
        self._lock = threading.Lock()
        self._sizes: dict[ObjectKey, int] = {}
        self._salts: dict[str, int] = {}
        self._used = 0
        self._reserved = 0
        self._pins: dict[ObjectKey, int] = {}
        self.refused = 0
        self._scan_failures = 0
        self._last_scan_error: str | None = None

    # -- stores ------------------------------------------------------------------------

    def reserve(self, keys: Sequence[ObjectKey], sizes: Sequence[int]) -> list[bool]:
        """Admit stores within capacity; the admitted bytes count until ``settle``."""
        out: list[bool] = []
        with self._lock:
            for key, size in zip(keys, sizes, strict=True):
                extra = max(0, size - self._sizes.get(key, 0))
                ok = not self.capacity or self._used + self._reserved + extra <= self.capacity
                if ok:
                    self._reserved += extra
                else:
                    self.refused += 1
                out.append(ok)
        return out

    def settle(self, keys: Sequence[ObjectKey], sizes: Sequence[int], ok: Sequence[bool]) -> None:
        """End reservations: successful stores become used bytes, failed ones vanish."""
        created: list[ObjectKey] = []
        with self._lock:
            for key, size, good in zip(keys, sizes, ok, strict=True):
                old = self._sizes.get(key, 0)
                self._reserved -= max(0, size - old)
                if good:
                    self._set(key, size)
                    created.append(key)
            if self.policy is not None and created:
                self.policy.on_created(created)

    def add_existing(self, items: Iterable[tuple[ObjectKey, int]]) -> int:
        """Count objects found in the backend at start-up; returns how many were new.

        ``items`` is the adapter's ``scan()`` generator: its I/O runs here, on the caller's
        thread, outside the lock.  When the scan raises, the objects listed before the error
        stay counted, the failure and its error text are recorded for ``status()`` (usage is
        then undercounted) and the exception propagates to the caller's task boundary
        (``ManagedAdapter.rebuild_usage`` logs it with the adapter's name).
        """
        n = 0
        try:
            for key, size in items:
                with self._lock:
                    if key in self._sizes:
                        continue
                    self._set(key, size)
                    if self.policy is not None:
                        self.policy.on_created([key])
                n += 1
        except Exception as exc:  # recorded, then re-raised
            with self._lock:
                self._scan_failures += 1
                self._last_scan_error = f"{type(exc).__name__}: {exc}"
            raise
        return n

    # -- reads and removal ------------------------------------------------------------

    def touched(self, keys: Sequence[ObjectKey]) -> None:
        if self.policy is not None and keys:
            with self._lock:
                self.policy.on_touched([k for k in keys if k in self._sizes])

    def removed(self, keys: Iterable[ObjectKey]) -> int:
        """Forget ``keys`` (deleted, or found gone); returns how many were counted."""
        return len(self.forget(keys))

    def forget(self, keys: Iterable[ObjectKey]) -> list[ObjectKey]:
        """Forget ``keys`` (deleted, or found gone); returns those that were counted."""
        with self._lock:
            gone = [k for k in keys if k in self._sizes]
            for key in gone:
                self._set(key, 0)
            if self.policy is not None and gone:
                self.policy.on_removed(gone)
        return gone

    def holds(self, key: ObjectKey) -> bool:
        """Whether ``key`` is counted (this node stored it, or a start-up scan found it)."""
        with self._lock:
            return key in self._sizes

    def pin(self, keys: Iterable[ObjectKey]) -> None:
        with self._lock:
            for key in keys:
                self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, keys: Iterable[ObjectKey]) -> None:
        with self._lock:
            for key in keys:
                left = self._pins.get(key, 0) - 1
                if left > 0:
                    self._pins[key] = left
                else:
                    self._pins.pop(key, None)

    # -- eviction ---------------------------------------------------------------------

    def pick(self, target_bytes: float, salt: str | None = None) -> list[ObjectKey]:
        """Least valuable unpinned keys (of ``salt`` only, when given) holding >= target."""
        if self.policy is None:
            return []
        chosen: list[ObjectKey] = []
        total = 0
        with self._lock:
            if salt is None:
                order: Iterator[ObjectKey] | Iterable[ObjectKey] = self.policy.victims(
                    self._evictable
                )
            else:
                buckets = self.policy.salt_buckets() or {}
                order = (k for k in buckets.get(salt, ()) if self._evictable(k))
            for key in order:
                chosen.append(key)
                total += self._sizes[key]
                if total >= target_bytes:
                    break
        return chosen

    def usage(self) -> Usage:
        with self._lock:
            return Usage(self._used, self.capacity, dict(self._salts), len(self._sizes))

    def status(self) -> dict[str, int | str | None]:
        """JSON-safe counters for /status: failed usage scans and the last one's error."""
        with self._lock:
            return {"scan_failures": self._scan_failures, "last_scan_error": self._last_scan_error}

    def snapshot(self) -> list[tuple[ObjectKey, int]]:
        """(key, size) of every known object, in insertion order (for listings)."""
        with self._lock:
            return list(self._sizes.items())

    def size_of(self, key: ObjectKey) -> int | None:
        with self._lock:
            return self._sizes.get(key)

    # -- internals (lock held) --------------------------------------------------------

    def _evictable(self, key: ObjectKey) -> bool:
        return key in self._sizes and key not in self._pins

    def _set(self, key: ObjectKey, size: int) -> None:
        old = self._sizes.pop(key, 0)
        if size:
            self._sizes[key] = size
        delta = size - old
        self._used += delta
        salt = key.cache_salt
        left = self._salts.get(salt, 0) + delta
        if left > 0:
            self._salts[salt] = left
        else:
            self._salts.pop(salt, None)
