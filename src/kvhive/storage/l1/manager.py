"""The L1 object table: reservations, resident objects, read locks and eviction.

Object states (one key is in at most one of them)::

    (absent) --reserve--> STAGING --commit--> RESIDENT --delete/evict/clear--> (absent)
                            |  \\--abort / write TTL expired + reclaimed--> (absent)
                            \\--write TTL expired + reserve again--> STAGING (handed over)

* STAGING: a write reservation of one owner with a deadline (write TTL); invisible to readers.
  One live reservation per key: a second writer gets None (the first one will provide it).
* RESIDENT: readable, content frozen.  Read locks (``locks.TTLLockTable``, read TTL) are
  counted per owner with per-owner deadlines; a live lock protects from eviction and from
  deletion without force.

Memory is byte based.  ``usage = used / configured`` where used counts resident and staging
bytes (physical, i.e. aligned) and configured is ``size_bytes`` (not the grown heap), so a lazy
arena is judged against its final size.  When ``reserve`` cannot allocate it reclaims expired
reservations, grows a lazy arena, then evicts inline in policy order until the request fits,
and only then drops what is left (counted in ``dropped_oom`` and logged, rate limited).
Partial success is normal: the first keys of a batch (the prefix) get memory first.

Background eviction (``evict_tick``, once per second from ``start()``): when usage >=
watermark, evict unlocked resident objects in policy order until ``eviction_ratio * used``
bytes are freed (at least one object).

IsolatedLRU in L1 (kvhive's definition; the reference's L1 loop crashes on it):
whitelist quotas from the ``QuotaRegistry`` against each salt's resident bytes.  On every
tick, a salt whose resident bytes >= ``watermark * limit`` loses its whole bucket when its
limit is 0 (no quota registered counts as 0), otherwise ``eviction_ratio`` of its bytes,
oldest first.  Then the global watermark rule applies as above, and inline eviction on
allocation failure takes the global least-recent object across all buckets.  Quotas never
block a write.

Threading: every public method is thread-safe and holds the one mutex ``_mu`` for its whole
body.  Listeners run after the mutex is released, in the global order in which the events
happened, on whichever caller thread drains the queue; they must not block.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.storage.eviction.base import EvictionPolicy
from kvhive.storage.l1.allocator import FreeListAllocator
from kvhive.storage.l1.arena import Arena
from kvhive.storage.l1.events import DropCounter, EventQueue
from kvhive.storage.l1.records import L1Stats, Listener, Reservation, Slot
from kvhive.storage.locks import Clock, Owner, TTLLockTable
from kvhive.storage.quota import QuotaRegistry

log = logging.getLogger(__name__)


class L1Manager:
    """The L1 tier's object table over one arena (see module docstring)."""

    def __init__(
        self,
        *,
        size_bytes: int,
        align_bytes: int,
        lazy: bool,
        init_bytes: int,
        write_ttl: float,
        read_ttl: float,
        policy: EvictionPolicy,
        watermark: float,
        eviction_ratio: float,
        quotas: QuotaRegistry | None = None,
        shm_name: str = "",
        clock: Clock = time.monotonic,
        evict_interval: float = 1.0,
        arena: Arena | None = None,
        bus: EventBus = DISABLED,
    ) -> None:
        """``arena`` may be injected (tests use small grow steps); else one is created.

        Sizes in bytes, TTLs and ``evict_interval`` in seconds of ``clock``.  Raises
        ValueError for inconsistent values before any memory is mapped.
        """
        if not 0.0 < watermark <= 1.0 or not 0.0 <= eviction_ratio <= 1.0:
            raise ValueError(f"bad watermark {watermark} / eviction_ratio {eviction_ratio}")
        if min(write_ttl, read_ttl, evict_interval) <= 0:
            raise ValueError("TTLs and the eviction interval must be positive")
        self._arena = arena or Arena(
            size_bytes, align=align_bytes, lazy=lazy, init_bytes=init_bytes, shm_name=shm_name
        )
        if (self._arena.size_bytes, self._arena.align) != (size_bytes, align_bytes):
            raise ValueError("injected arena does not match size_bytes / align_bytes")
        self._alloc = FreeListAllocator(self._arena.heap_bytes, align_bytes)
        self._size = size_bytes
        self._write_ttl = write_ttl
        self._clock = clock
        self._reads: TTLLockTable[ObjectKey] = TTLLockTable(read_ttl, clock)
        self._policy = policy
        self._quotas = quotas
        self._watermark = watermark
        self._ratio = eviction_ratio
        self._mu = threading.Lock()
        self._bus = bus  # publish() is a non-blocking enqueue; fine under the mutex
        self._objects: dict[ObjectKey, Slot] = {}
        self._staging: dict[ObjectKey, Reservation] = {}
        self._salt_bytes: dict[str, int] = {}
        self._temporary: set[ObjectKey] = set()  # removed when their last read lock goes
        self._resident_bytes = self._staging_bytes = 0
        self._evicted_objects = self._evicted_bytes = 0
        self._expired = self._evictor_errors = 0
        self._drops = DropCounter()
        self._events = EventQueue()
        self._interval = evict_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        if policy.salt_buckets() is not None:
            log.warning("L1 %s: salts without a quota are evicted on every tick", policy.name)

    # -- properties ------------------------------------------------------------------------

    @property
    def arena(self) -> Arena:
        return self._arena

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def usage(self) -> float:
        """Used bytes (resident + staging, physical) / configured size."""
        return self._alloc.allocated_bytes / self._size

    # -- write path ------------------------------------------------------------------------

    def reserve(self, keys: Sequence[ObjectKey], nbytes: int, owner: Owner) -> list[Slot | None]:
        """Reserve ``nbytes`` (logical) per key for writing, owned by ``owner``.

        Per key: a Slot, or None when the key is resident, reserved by a live writer (any
        owner, or earlier in this batch), or no memory was left after growth and inline
        eviction.  The caller owns each Slot until ``commit``/``abort`` or write-TTL expiry.
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        phys = self._alloc.physical(nbytes)
        out: list[Slot | None] = [None] * len(keys)
        with self._mu:
            self._check_open()
            now = self._clock()
            deadline = now + self._write_ttl
            need: list[int] = []
            seen: set[ObjectKey] = set()
            for i, key in enumerate(keys):
                if key in self._objects or key in seen:
                    continue
                seen.add(key)
                res = self._staging.get(key)
                if res is not None:
                    if res.deadline > now:
                        continue
                    self._expired += 1
                    if self._alloc.physical(res.slot.nbytes) == phys:  # hand the buffer over
                        slot = Slot(key, res.slot.offset, nbytes)
                        self._staging[key] = Reservation(slot, owner, deadline)
                        out[i] = slot
                        continue
                    self._free_reservation(key, res)
                need.append(i)
            offsets = self._allocate(phys, len(need), now) if need else []
            for i, offset in zip(need, offsets, strict=False):  # offsets may be short
                slot = Slot(keys[i], offset, nbytes)
                self._staging[slot.key] = Reservation(slot, owner, deadline)
                out[i] = slot
            self._staging_bytes += len(offsets) * phys
            if len(offsets) < len(need):
                used = self._alloc.allocated_bytes
                self._drops.add(len(need) - len(offsets), now, used, self._size)
                if self._bus.enabled:
                    lost = [keys[i] for i in need[len(offsets) :]]
                    self._bus.publish(
                        ev.L1AllocationFailed(keys=lost, model_name=lost[0].model_name)
                    )
        self._events.drain()
        return out

    def view(self, slot: Slot) -> np.ndarray:
        """Writable uint8 view of exactly ``slot.nbytes`` bytes of the arena (zero copy).

        Valid while the caller owns the slot (a reservation or a read lock); lock-free.
        Raises RuntimeError once L1 is closed.
        """
        view = self._arena.array[slot.offset : slot.offset + slot.nbytes]
        if view.size != slot.nbytes:
            raise RuntimeError("L1 is closed")
        return view

    def commit(
        self, slots: Sequence[Slot], *, temporary: bool = False, announce: bool = True
    ) -> list[bool]:
        """Make reserved slots resident and readable (the policy sees them as created).

        False for a slot that is no longer its key's reservation or whose write TTL had
        expired (then its memory is freed).  Emits "committed" for the others unless
        ``announce`` is False (objects loaded from L2 must not be written back to it).
        A ``temporary`` object is removed as soon as its last read lock is released
        (``unlock``/``release_owners``); until someone locks it, it is simply evictable.
        """
        out: list[bool] = []
        committed: list[ObjectKey] = []
        with self._mu:
            now = self._clock()
            for slot in slots:
                res = self._staging.get(slot.key)
                if res is None or res.slot is not slot:
                    out.append(False)
                    continue
                if res.deadline <= now:
                    self._expired += 1
                    self._free_reservation(slot.key, res)
                    out.append(False)
                    continue
                phys = self._alloc.physical(slot.nbytes)
                del self._staging[slot.key]
                self._staging_bytes -= phys
                self._objects[slot.key] = slot
                self._resident_bytes += phys
                salt = slot.key.cache_salt
                self._salt_bytes[salt] = self._salt_bytes.get(salt, 0) + phys
                committed.append(slot.key)
                out.append(True)
            if temporary:
                self._temporary.update(committed)
            if committed:
                self._policy.on_created(committed)
                if announce:
                    self._events.record("committed", committed)
                if self._bus.enabled:
                    total = sum(self._alloc.physical(self._objects[k].nbytes) for k in committed)
                    self._bus.publish(ev.L1WriteFinished(keys=committed, total_bytes=total))
        self._events.drain()
        return out

    def abort(self, slots: Sequence[Slot]) -> int:
        """Free reservations (failed copy, cancelled store); returns how many were freed."""
        freed = 0
        with self._mu:
            for slot in slots:
                res = self._staging.get(slot.key)
                if res is not None and res.slot is slot:
                    self._free_reservation(slot.key, res)
                    freed += 1
        return freed

    # -- read path -------------------------------------------------------------------------

    def lock_prefix(self, rows: Iterable[Sequence[ObjectKey]], count: int, owner: Owner) -> int:
        """Read-lock the longest fully resident prefix of ``rows``; returns its length L.

        ``rows[i]`` is every key chunk i needs.  Each key of ``rows[:L]`` gets ``count`` read
        locks owned by ``owner`` (read TTL) and is touched for recency; later rows are not
        locked.  The owner must release them with ``unlock`` (or ``release_owners``).
        """
        if count < 1:
            raise ValueError(f"lock count must be >= 1, got {count}")
        flat: list[ObjectKey] = []
        with self._mu:
            objects = self._objects
            hits = 0
            for row in rows:
                for key in row:  # no all(<generator>): a generator per row costs more
                    if key not in objects:
                        break
                else:
                    flat.extend(row)
                    hits += 1
                    continue
                break
            if hits:
                self._reads.acquire(flat, owner, count)
                self._policy.on_touched(flat)
        return hits

    def read_lock(
        self, keys: Sequence[ObjectKey], owner: Owner, count: int = 1
    ) -> list[Slot | None]:
        """Add ``count`` read locks of ``owner`` on each resident key; None for the others."""
        with self._mu:
            slots = [self._objects.get(key) for key in keys]
            self._reads.acquire([s.key for s in slots if s is not None], owner, count)
        return slots

    def resident(self, keys: Sequence[ObjectKey]) -> list[Slot | None]:
        """Slots of resident keys without locking (for holders that already have locks)."""
        with self._mu:
            return [self._objects.get(key) for key in keys]

    def unlock(self, keys: Iterable[ObjectKey], owner: Owner, count: int = 1) -> int:
        """Release up to ``count`` live read locks of ``owner`` per key; returns how many.

        Temporary objects left without any read lock are removed.
        """
        with self._mu:
            keys = list(keys)
            released = sum(self._reads.release(key, owner, count) for key in keys)
            if self._temporary:
                self._drop_unlocked_temporary(keys)
        self._events.drain()
        return released

    def release_owners(self, match: Callable[[Owner], bool]) -> tuple[int, int]:
        """Drop every read lock and reservation of owners matching ``match`` (dead client).

        ``match`` is called on every owner that holds something, so it must accept any
        Owner.  Returns (live read locks released, reservations freed).
        """
        with self._mu:
            locks = self._reads.release_owners(match)
            dead = [(k, r) for k, r in self._staging.items() if match(r.owner)]
            for key, res in dead:
                self._free_reservation(key, res)
            if locks and self._temporary:
                self._drop_unlocked_temporary(list(self._temporary))
        self._events.drain()
        return locks, len(dead)

    def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        with self._mu:
            return [key in self._objects for key in keys]

    def touch(self, keys: Sequence[ObjectKey]) -> None:
        """Mark resident keys as used (recency), batch rule of the policy applies."""
        with self._mu:
            self._policy.on_touched([key for key in keys if key in self._objects])

    # -- removal ---------------------------------------------------------------------------

    def delete(self, keys: Iterable[ObjectKey], force: bool = False) -> int:
        """Remove objects and reservations; returns how many were removed.

        Without ``force``, read-locked objects and live reservations are kept.
        """
        with self._mu:
            now = self._clock()
            gone: list[ObjectKey] = []
            freed = 0
            for key in dict.fromkeys(keys):
                if key in self._objects:
                    if force or not self._reads.is_locked(key):
                        gone.append(key)
                    continue
                res = self._staging.get(key)
                if res is not None and (force or res.deadline <= now):
                    self._free_reservation(key, res)
                    freed += 1
            self._remove(gone, evicted=False)
        self._events.drain()
        return len(gone) + freed

    def clear(self, force: bool = False) -> int:
        """Remove unlocked objects and expired reservations (everything with ``force``)."""
        with self._mu:
            if force:
                gone = list(self._objects)
                self._reads.clear()
                freed = len(self._staging)
                for key, res in list(self._staging.items()):
                    self._free_reservation(key, res)
            else:
                gone = [k for k in self._objects if not self._reads.is_locked(k)]
                freed = self._reclaim_expired(self._clock())
            self._remove(gone, evicted=False)
        self._events.drain()
        return len(gone) + freed

    # -- eviction --------------------------------------------------------------------------

    def evict_tick(self) -> int:
        """One background eviction pass (module docstring); returns objects evicted."""
        with self._mu:
            before = self._evicted_objects
            self._reclaim_expired(self._clock())
            buckets = self._policy.salt_buckets()
            if buckets is not None:
                self._enforce_quotas(buckets)
            used = self._alloc.allocated_bytes
            triggered = bool(used and used >= self._watermark * self._size)
            if triggered:
                victims = self._pick(self._policy.victims(self._evictable), self._ratio * used)
                self._remove(victims, evicted=True)
            evicted = self._evicted_objects - before
            if self._bus.enabled:
                self._bus.publish(
                    ev.L1EvictionTick(
                        usage=used / self._size,
                        watermark=self._watermark,
                        triggered=triggered or evicted > 0,
                        evicted=evicted,
                    )
                )
        self._events.drain()
        return evicted

    def start(self) -> None:
        """Launch the daemon thread that calls ``evict_tick`` every ``evict_interval`` s."""
        with self._mu:
            self._check_open()
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._evict_loop, name="kvhive-l1-evictor", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the evictor, forget every object and release the arena (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mu:
            if self._closed:
                return
            self._closed = True
            self._objects.clear()
            self._staging.clear()
            self._reads.clear()
            self._arena.close()

    # -- observation -----------------------------------------------------------------------

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(event, keys)`` for "committed" and "removed" (see module docstring)."""
        with self._mu:
            self._events.add_listener(fn)

    def list_objects(self, start: int, limit: int) -> tuple[list[Slot], int]:
        """Up to ``limit`` resident slots from position ``start`` of the object table (insertion
        order) and the table size; positions shift as objects come and go (best effort paging)."""
        with self._mu:
            total = len(self._objects)
            return list(itertools.islice(self._objects.values(), start, start + limit)), total

    def stats(self) -> L1Stats:
        with self._mu:
            used = self._alloc.allocated_bytes
            healthy = self._alloc.memcheck() and used == (
                self._resident_bytes + self._staging_bytes
            )
            return L1Stats(
                objects=len(self._objects),
                temporary_objects=len(self._temporary),
                staging_objects=len(self._staging),
                read_locked_objects=self._reads.locked_keys(),
                used_bytes=used,
                staging_bytes=self._staging_bytes,
                heap_bytes=self._alloc.heap_bytes,
                configured_bytes=self._size,
                usage=used / self._size,
                evicted_objects=self._evicted_objects,
                evicted_bytes=self._evicted_bytes,
                dropped_oom=self._drops.total,
                expired_reservations=self._expired,
                evictor_errors=self._evictor_errors,
                healthy=healthy and not self._closed,
            )

    # -- internals (called with _mu held, except _evict_loop) -----------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("L1 is closed")

    def _allocate(self, phys: int, count: int, now: float) -> list[int]:
        """Up to ``count`` offsets of ``phys`` bytes: reclaim, grow, then evict inline."""
        alloc = self._alloc
        offsets = alloc.allocate_many(phys, count)
        if len(offsets) < count and self._reclaim_expired(now):
            offsets += alloc.allocate_many(phys, count - len(offsets))
        if len(offsets) < count and self._arena.grow((count - len(offsets)) * phys):
            alloc.extend(self._arena.heap_bytes)
            offsets += alloc.allocate_many(phys, count - len(offsets))
        while len(offsets) < count:
            # Byte based: free what is missing; loop again if fragmentation defeats it.
            missing = (count - len(offsets)) * phys
            victims = self._pick(self._policy.victims(self._evictable), missing)
            if not victims:
                break
            self._remove(victims, evicted=True)
            offsets += alloc.allocate_many(phys, count - len(offsets))
        return offsets

    def _evictable(self, key: ObjectKey) -> bool:
        return key in self._objects and not self._reads.is_locked(key)

    def _pick(self, candidates: Iterable[ObjectKey], target: float) -> list[ObjectKey]:
        """Take candidates in order until they hold >= ``target`` bytes (at least one)."""
        chosen: list[ObjectKey] = []
        total = 0
        for key in candidates:
            chosen.append(key)
            total += self._alloc.physical(self._objects[key].nbytes)
            if total >= target:
                break
        return chosen

    def _remove(self, keys: list[ObjectKey], *, evicted: bool) -> None:
        """Forget resident ``keys``, free their memory and drop their read locks."""
        if not keys:
            return
        ranges: list[tuple[int, int]] = []
        total = 0
        for key in keys:
            slot = self._objects.pop(key)
            phys = self._alloc.physical(slot.nbytes)
            ranges.append((slot.offset, phys))
            total += phys
            left = self._salt_bytes[key.cache_salt] - phys
            if left:
                self._salt_bytes[key.cache_salt] = left
            else:
                del self._salt_bytes[key.cache_salt]
            self._reads.drop(key)
            self._temporary.discard(key)
        self._alloc.free_many(ranges)
        self._resident_bytes -= total
        self._policy.on_removed(keys)
        if evicted:
            self._evicted_objects += len(keys)
            self._evicted_bytes += total
        self._events.record("removed", keys)
        if self._bus.enabled:
            self._bus.publish(
                ev.L1KeysEvicted(keys=keys, reason="evicted" if evicted else "deleted")
            )

    def _drop_unlocked_temporary(self, keys: Iterable[ObjectKey]) -> None:
        gone = [k for k in keys if k in self._temporary and not self._reads.is_locked(k)]
        self._remove(gone, evicted=False)

    def _free_reservation(self, key: ObjectKey, res: Reservation) -> None:
        del self._staging[key]
        phys = self._alloc.physical(res.slot.nbytes)
        self._alloc.free(res.slot.offset, phys)
        self._staging_bytes -= phys

    def _reclaim_expired(self, now: float) -> int:
        """Free reservations past their write TTL (writer died or hung); returns how many."""
        expired = [(k, r) for k, r in self._staging.items() if r.deadline <= now]
        for key, res in expired:
            self._free_reservation(key, res)
        self._expired += len(expired)
        return len(expired)

    def _enforce_quotas(self, buckets: Mapping[str, Iterable[ObjectKey]]) -> None:
        """IsolatedLRU whitelist quotas against per-salt resident bytes (module docstring)."""
        chosen: list[ObjectKey] = []
        for salt, keys in buckets.items():
            used = self._salt_bytes.get(salt, 0)
            limit = (self._quotas.get(salt) if self._quotas else None) or 0
            if used <= 0 or used < self._watermark * limit:
                continue
            target = used if limit == 0 else self._ratio * used
            chosen += self._pick((k for k in keys if self._evictable(k)), target)
        self._remove(chosen, evicted=True)  # after iterating: removal edits the buckets

    def _evict_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.evict_tick()
            except Exception:  # task boundary: count, log, keep the loop alive
                self._evictor_errors += 1
                log.exception("L1 eviction tick failed")
