"""Owner-aware, counted TTL locks.

The reference keeps one counter and one shared deadline per object, so a new lock extends
every old one and a dead reader is protected by the living.  Here each owner's holds on a
key carry their own deadline::

    key -> {owner: Hold(count, deadline)}        owner -> {keys it holds}

(internally holds are keyed by a per-owner record with an identity hash, so a call on N
keys hashes its owner once; an owner's record lives exactly while it holds a key)

* ``acquire`` adds ``count`` holds for the owner and moves only that owner's deadline to
  ``now + ttl``; if the owner's previous holds had expired, its count restarts.
* A hold whose deadline has passed counts as unlocked; it is pruned lazily, whenever its key
  or owner is looked at again (so expiry needs no sweeper thread).
* ``release_owners`` drops everything of matching owners at once (client unregistered or
  reaped) through the owner index, without scanning all keys.

An ``Owner`` is one of the records of :mod:`kvhive.storage.owners` (e.g.
``LookupOwner(request_id, model_name, kv_rank)``, ``WriterOwner(instance_id)``); that module
also tabulates who takes which locks and who gives them back.  Times are seconds on the
injectable ``clock``.

Not thread-safe: the owner of the table (``L1Manager``) serialises calls under its mutex.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kvhive.storage.owners import Owner

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class Hold:
    """``count`` locks of one owner on one key, valid while ``clock() < deadline``."""

    count: int
    deadline: float


class _Holder:
    """One owner as the table knows it while it holds anything: the owner and its keys.

    Per-key holds are keyed by this record, whose hash is its identity (C-level), so a lock
    operation on N keys hashes the owner once rather than N times (an owner record's own
    ``__hash__`` runs in Python)."""

    __slots__ = ("owner", "keys")

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.keys: set[Any] = set()


class TTLLockTable(Generic[K]):
    """Counted locks per (key, owner), each owner with its own deadline (module docstring)."""

    __slots__ = ("ttl", "_clock", "_by_key", "_holders")

    def __init__(self, ttl: float, clock: Clock = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.ttl = ttl
        self._clock = clock
        self._by_key: dict[K, dict[_Holder, Hold]] = {}
        # owner -> its record; present exactly while the owner holds at least one key
        self._holders: dict[Owner, _Holder] = {}

    def acquire(self, keys: Iterable[K], owner: Owner, count: int = 1) -> None:
        """Add ``count`` holds of ``owner`` on each key; refreshes that owner's deadline."""
        if count < 1:
            raise ValueError(f"lock count must be >= 1, got {count}")
        keys = keys if isinstance(keys, list) else list(keys)
        if not keys:  # leave no empty index entry behind
            return
        now = self._clock()
        deadline = now + self.ttl
        holder = self._holders.get(owner)
        if holder is None:
            holder = self._holders[owner] = _Holder(owner)
        by_key = self._by_key
        for key in keys:
            holds = by_key.get(key)
            if holds is None:  # the common case first: nobody holds this key yet
                by_key[key] = {holder: Hold(count, deadline)}
                continue
            hold = holds.get(holder)
            if hold is None:
                holds[holder] = Hold(count, deadline)
            elif hold.deadline <= now:  # expired: start over rather than resurrect
                hold.count, hold.deadline = count, deadline
            else:
                hold.count += count
                hold.deadline = deadline
        holder.keys.update(keys)  # one C-level pass: the owner now holds every key

    def release(self, key: K, owner: Owner, count: int = 1) -> int:
        """Give back up to ``count`` live holds; returns how many were released.

        Expired holds release nothing (0): the lock was already gone.
        """
        return self.release_many((key,), owner, count)

    def release_many(self, keys: Iterable[K], owner: Owner, count: int = 1) -> int:
        """:meth:`release` for each key (one clock reading for all); returns the total."""
        holder = self._holders.get(owner)
        if holder is None:
            return 0
        now = self._clock()
        by_key = self._by_key
        released = 0
        for key in keys:
            holds = by_key.get(key)
            hold = holds.get(holder) if holds else None
            if hold is None:
                continue
            if hold.deadline <= now:
                self._forget(key, holder)
                continue
            n = min(count, hold.count)
            released += n
            hold.count -= n
            if hold.count == 0:
                self._forget(key, holder)
        return released

    def is_locked(self, key: K) -> bool:
        """True while any owner holds a live lock on ``key``; prunes expired holds."""
        holds = self._by_key.get(key)
        if not holds:
            return False
        now = self._clock()
        dead = [o for o, h in holds.items() if h.deadline <= now]
        live = len(dead) < len(holds)
        for holder in dead:
            self._forget(key, holder)
        return live

    def live_count(self, key: K) -> int:
        """Total live holds on ``key`` over all owners (no pruning)."""
        now = self._clock()
        holds = self._by_key.get(key, {})
        return sum(h.count for h in holds.values() if h.deadline > now)

    def locked_keys(self) -> int:
        """Number of keys with at least one live hold (O(locked keys); for stats)."""
        now = self._clock()
        return sum(
            1 for holds in self._by_key.values() if any(h.deadline > now for h in holds.values())
        )

    def drop(self, key: K) -> None:
        """Forget every hold on ``key`` (the object is gone)."""
        for holder in self._by_key.pop(key, {}):
            holder.keys.discard(key)
            if not holder.keys:
                del self._holders[holder.owner]

    def drop_holds(self, key: K, match: Callable[[Owner], bool]) -> int:
        """Forget the holds on ``key`` of the owners ``match`` accepts (however many and
        however live); returns the live holds dropped."""
        holds = self._by_key.get(key)
        if not holds:
            return 0
        now = self._clock()
        dropped = 0
        for holder in [h for h in holds if match(h.owner)]:
            hold = holds[holder]
            if hold.deadline > now:
                dropped += hold.count
            self._forget(key, holder)
            if key not in self._by_key:
                break
        return dropped

    def release_owners(self, match: Callable[[Owner], bool]) -> int:
        """Drop all holds of owners for which ``match`` is true; returns live holds dropped."""
        now = self._clock()
        released = 0
        by_key = self._by_key
        for holder in [h for o, h in self._holders.items() if match(o)]:
            for key in holder.keys:
                holds = by_key[key]
                hold = holds.pop(holder)
                if hold.deadline > now:
                    released += hold.count
                if not holds:
                    del by_key[key]
            holder.keys.clear()
            del self._holders[holder.owner]
        return released

    def clear(self) -> None:
        self._by_key.clear()
        self._holders.clear()

    def _forget(self, key: K, holder: _Holder) -> None:
        holds = self._by_key[key]
        del holds[holder]
        if not holds:
            del self._by_key[key]
        holder.keys.discard(key)
        if not holder.keys:
            del self._holders[holder.owner]
