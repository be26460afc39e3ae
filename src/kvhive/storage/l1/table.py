"""ObjectTable: the L1 object state machine and its byte accounting.

Keys, their states and the arena bytes they hold (see ``manager.py`` for the state diagram):
``_staging`` maps a key to its write reservation, ``_objects`` to its resident slot; read
locks live in a ``TTLLockTable``.  A forced removal of memory that someone still uses dooms
it instead of freeing it (:class:`~kvhive.storage.l1.doomed.DoomedMemory`: removed-but-still-read
slots freed once no live read lock on the key remains; removed reservations freed by their
writer's commit, which fails, or abort, or by their write TTL).  Every
transition keeps the accounting exact: ``allocated = resident_bytes + staging_bytes +
doomed_bytes`` (physical, i.e. aligned, bytes) and ``salt_bytes`` sums resident bytes per
``cache_salt``.  Transitions tell the eviction policy (created / touched / removed), queue
listener events ("committed", "removed") and publish bus events.

Read locks are counted per key, not per slot, so while a doomed slot waits for its readers a
new object of the same key may be stored; it shares the key's locks.  That only ever delays a
free: a doomed slot is freed when the key has no live lock at all, which implies its own
readers are done (each holds at least one lock until its copy ends).

Not thread-safe: the owning :class:`~kvhive.storage.l1.manager.L1Manager` calls every method
with its mutex ``_mu`` held and drains the listener queue after releasing it.  The table
never allocates fresh memory itself: ``reserve`` asks the ``allocate`` callback it is given
(the :class:`~kvhive.storage.l1.reclaim.Reclaimer`, which may call back into ``remove`` and
``reclaim_expired``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.storage.eviction.base import EvictionPolicy
from kvhive.storage.l1.allocator import FreeListAllocator
from kvhive.storage.l1.doomed import DoomedMemory
from kvhive.storage.l1.events import DropCounter, EventQueue
from kvhive.storage.l1.records import L1Params, L1Stats, Reservation, Slot
from kvhive.storage.locks import Clock, Owner, TTLLockTable
from kvhive.storage.owners import LookupOwner

Allocate = Callable[[int, int, float], list[int]]
"""``allocate(phys, count, now)``: up to ``count`` offsets of ``phys`` bytes (may be short)."""


class ObjectTable:
    """Reservations, resident objects, read locks and their bytes (module docstring)."""

    def __init__(
        self,
        alloc: FreeListAllocator,
        params: L1Params,
        *,
        policy: EvictionPolicy,
        clock: Clock,
        events: EventQueue,
        bus: EventBus,
    ) -> None:
        self.alloc = alloc
        self._size = params.size_bytes
        self._write_ttl = params.write_ttl
        self._reads: TTLLockTable[ObjectKey] = TTLLockTable(params.read_ttl, clock)
        self._policy = policy
        self._events = events
        self._bus = bus  # publish() is a non-blocking enqueue; fine under the mutex
        self._objects: dict[ObjectKey, Slot] = {}
        self._staging: dict[ObjectKey, Reservation] = {}
        self._salt_bytes: Counter[str] = Counter()  # resident bytes per cache_salt
        self._temporary: set[ObjectKey] = set()  # removed when their last read lock goes
        self._doomed = DoomedMemory(self.alloc)  # removed by force while still in use
        self._resident_bytes = self._staging_bytes = 0
        self.evicted_objects = self.evicted_bytes = self.expired = 0
        self._drops = DropCounter()

    # -- write path (see L1Manager for the contracts) ----------------------------------------

    def reserve(
        self, keys: Sequence[ObjectKey], nbytes: int, owner: Owner, now: float, allocate: Allocate
    ) -> list[Slot | None]:
        """Reservations for the keys that are neither resident nor live-reserved; a dead
        writer's buffer of the same physical size is handed over, the rest is allocated."""
        phys = self.alloc.physical(nbytes)
        out: list[Slot | None] = [None] * len(keys)
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
                self.expired += 1
                if self.alloc.physical(res.slot.nbytes) == phys:  # hand the buffer over
                    slot = Slot(key, res.slot.offset, nbytes)
                    self._staging[key] = Reservation(slot, owner, deadline)
                    out[i] = slot
                    continue
                self.free_reservation(key, res)
            need.append(i)
        offsets = allocate(phys, len(need), now) if need else []
        for i, offset in zip(need, offsets, strict=False):  # offsets may be short
            slot = Slot(keys[i], offset, nbytes)
            self._staging[slot.key] = Reservation(slot, owner, deadline)
            out[i] = slot
        self._staging_bytes += len(offsets) * phys
        if len(offsets) < len(need):
            self._dropped([keys[i] for i in need[len(offsets) :]], now)
        return out

    def _dropped(self, lost: list[ObjectKey], now: float) -> None:
        self._drops.add(len(lost), now, self.alloc.allocated_bytes, self._size)
        if self._bus.enabled:
            self._bus.publish(ev.L1AllocationFailed(keys=lost, model_name=lost[0].model_name))

    def commit(
        self, slots: Sequence[Slot], now: float, *, temporary: bool, announce: bool
    ) -> list[bool]:
        out: list[bool] = []
        committed: list[ObjectKey] = []
        for slot in slots:
            res = self._staging.get(slot.key)
            if res is None or res.slot is not slot:
                self._doomed.free_write(slot)  # removed by force while written: fails, frees
                out.append(False)
                continue
            if res.deadline <= now:
                self.expired += 1
                self.free_reservation(slot.key, res)
                out.append(False)
                continue
            phys = self.alloc.physical(slot.nbytes)
            del self._staging[slot.key]
            self._staging_bytes -= phys
            self._objects[slot.key] = slot
            self._resident_bytes += phys
            self._salt_bytes[slot.key.cache_salt] += phys
            committed.append(slot.key)
            out.append(True)
        if temporary:
            self._temporary.update(committed)
        if committed:
            self._policy.on_created(committed)
            if announce:
                self._events.record("committed", committed)
            if self._bus.enabled:
                total = sum(self.alloc.physical(self._objects[k].nbytes) for k in committed)
                self._bus.publish(ev.L1WriteFinished(keys=committed, total_bytes=total))
        return out

    def abort(self, slots: Sequence[Slot]) -> int:
        freed = 0
        for slot in slots:
            res = self._staging.get(slot.key)
            if res is not None and res.slot is slot:
                self.free_reservation(slot.key, res)
                freed += 1
            elif self._doomed.free_write(slot):
                freed += 1
        return freed

    # -- read path -------------------------------------------------------------------------

    def lock_prefix(self, rows: Iterable[Sequence[ObjectKey]], count: int, owner: Owner) -> int:
        objects = self._objects
        flat: list[ObjectKey] = []
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

    def read_lock(self, keys: Sequence[ObjectKey], owner: Owner, count: int) -> list[Slot | None]:
        slots = [self._objects.get(key) for key in keys]
        self._reads.acquire([s.key for s in slots if s is not None], owner, count)
        return slots

    def resident(self, keys: Iterable[ObjectKey]) -> list[Slot | None]:
        return [self._objects.get(key) for key in keys]

    def touch(self, keys: Iterable[ObjectKey]) -> None:
        self._policy.on_touched([key for key in keys if key in self._objects])

    def unlock(self, keys: list[ObjectKey], owner: Owner, count: int) -> int:
        released = self._reads.release_many(keys, owner, count)
        if self._temporary:
            self._drop_unlocked_temporary(keys)
        self._doomed.free_unread(keys, self._reads.is_locked)
        return released

    def release_owners(self, match: Callable[[Owner], bool]) -> tuple[int, int]:
        locks = self._reads.release_owners(match)
        dead = [(k, r) for k, r in self._staging.items() if match(r.owner)]
        for key, res in dead:
            self.free_reservation(key, res)
        doomed = self._doomed.free_writes(lambda r: match(r.owner))
        if locks and self._temporary:
            self._drop_unlocked_temporary(list(self._temporary))
        if locks:
            self._doomed.free_unread(None, self._reads.is_locked)
        return locks, len(dead) + doomed

    # -- removal ---------------------------------------------------------------------------

    def delete(self, keys: Iterable[ObjectKey], force: bool, now: float) -> int:
        gone: list[ObjectKey] = []
        doomed: list[ObjectKey] = []
        freed = 0
        for key in dict.fromkeys(keys):
            if key in self._objects:
                if not self._reads.is_locked(key):
                    gone.append(key)
                elif force:
                    doomed.append(key)
                continue
            res = self._staging.get(key)
            if res is not None and (force or res.deadline <= now):
                self._end_reservation(key, res, now)
                freed += 1
        self.remove(gone, evicted=False)
        self._doom(doomed)
        return len(gone) + len(doomed) + freed

    def clear(self, force: bool, now: float) -> int:
        """``delete`` of every resident and reserved key (unforced: expired ones first)."""
        freed = 0 if force else self.reclaim_expired(now)
        return freed + self.delete([*self._objects, *self._staging], force, now)

    def forget_all(self) -> None:
        """Drop every object, reservation and lock without accounting (L1 is closing)."""
        self._objects.clear()
        self._staging.clear()
        self._doomed.forget_all()
        self._reads.clear()

    # -- primitives for the reclaimer ------------------------------------------------------

    def evictable(self, key: ObjectKey) -> bool:
        """Resident and without a live read lock."""
        return key in self._objects and not self._reads.is_locked(key)

    def physical_bytes(self, key: ObjectKey) -> int:
        return self.alloc.physical(self._objects[key].nbytes)

    def salt_bytes(self, salt: str) -> int:
        return self._salt_bytes.get(salt, 0)

    def remove(self, keys: list[ObjectKey], *, evicted: bool) -> None:
        """Forget resident ``keys`` (unlocked, or their readers are gone), free their memory
        and drop their read locks."""
        if not keys:
            return
        slots = self._unlist(keys, evicted=evicted)
        phys = self.alloc.physical
        self.alloc.free_many([(s.offset, phys(s.nbytes)) for s in slots])
        for key in keys:
            self._reads.drop(key)
        # an unlocked key has no readers left on its older doomed slots
        self._doomed.free_unread(keys, self._reads.is_locked)

    def free_reservation(self, key: ObjectKey, res: Reservation) -> None:
        del self._staging[key]
        phys = self.alloc.physical(res.slot.nbytes)
        self.alloc.free(res.slot.offset, phys)
        self._staging_bytes -= phys

    def reclaim_expired(self, now: float) -> int:
        """Free reservations past their write TTL (writer died or hung), and doomed memory
        nobody uses any more (its read locks expired); returns the reservations freed."""
        expired = [(k, r) for k, r in self._staging.items() if r.deadline <= now]
        for key, res in expired:
            self.free_reservation(key, res)
        late = self._doomed.free_writes(lambda r: r.deadline <= now)
        self._doomed.free_unread(None, self._reads.is_locked)
        self.expired += len(expired) + late
        return len(expired) + late

    # -- forced removal of memory in use ---------------------------------------------------

    def _unlist(self, keys: list[ObjectKey], *, evicted: bool) -> list[Slot]:
        """Take resident ``keys`` out of the object table (invisible from now on) with their
        resident accounting, policy and events; their memory is the caller's to free."""
        slots: list[Slot] = []
        total = 0
        for key in keys:
            slot = self._objects.pop(key)
            slots.append(slot)
            phys = self.alloc.physical(slot.nbytes)
            total += phys
            self._salt_bytes[key.cache_salt] -= phys
            self._temporary.discard(key)
        self._resident_bytes -= total
        self._policy.on_removed(keys)
        if evicted:
            self.evicted_objects += len(keys)
            self.evicted_bytes += total
        self._events.record("removed", keys)
        if self._bus.enabled:
            self._bus.publish(
                ev.L1KeysEvicted(keys=keys, reason="evicted" if evicted else "deleted")
            )
        return slots

    def _doom(self, keys: list[ObjectKey]) -> None:
        """Forced removal of read-locked ``keys``: gone for every new lookup and lock, their
        memory kept (as doomed bytes) until the key's last live read lock is released.

        A lookup's locks (``LookupOwner``) only promise a later retrieve, which will now miss
        (a soft failure): they are dropped here, so memory no copy is using is freed at once
        instead of staying doomed until the read TTL.  Locks of running copies (``CopyPin``,
        ``WorkerCopyPin``) and of write-behind reads keep the memory."""
        if not keys:
            return
        in_use: list[ObjectKey] = []
        unused: list[ObjectKey] = []
        for key in keys:
            self._reads.drop_holds(key, _is_lookup_lock)
            (in_use if self._reads.is_locked(key) else unused).append(key)
        self.remove(unused, evicted=False)
        self._doomed.add_reads(self._unlist(in_use, evicted=False))

    def _end_reservation(self, key: ObjectKey, res: Reservation, now: float) -> None:
        """Forced removal of a reservation: an expired one is freed; a live one may still be
        written, so it is doomed: its commit fails, and commit/abort/TTL free the memory."""
        if res.deadline <= now:
            self.free_reservation(key, res)
            return
        del self._staging[key]
        self._staging_bytes -= self.alloc.physical(res.slot.nbytes)
        self._doomed.add_write(res)

    def _drop_unlocked_temporary(self, keys: Iterable[ObjectKey]) -> None:
        gone = [k for k in keys if k in self._temporary and not self._reads.is_locked(k)]
        self.remove(gone, evicted=False)


def _is_lookup_lock(owner: Owner) -> bool:
    return isinstance(owner, LookupOwner)


# -- observation (module functions: they only read the table) ----------------------------


def table_page(table: ObjectTable, start: int, limit: int) -> tuple[list[Slot], int]:
    """Resident slots ``[start, start + limit)`` in insertion order, and the table size."""
    return list(itertools.islice(table._objects.values(), start, start + limit)), len(
        table._objects
    )


def table_stats(
    table: ObjectTable, *, evictor_errors: int, listener_failures: int, is_open: bool
) -> L1Stats:
    """The table's :class:`L1Stats` (and its accounting self-check); under the L1 mutex."""
    used = table.alloc.allocated_bytes
    accounted = table._resident_bytes + table._staging_bytes + table._doomed.bytes
    healthy = table.alloc.memcheck() and used == accounted
    return L1Stats(
        objects=len(table._objects),
        temporary_objects=len(table._temporary),
        staging_objects=len(table._staging),
        read_locked_objects=table._reads.locked_keys(),
        doomed_objects=table._doomed.objects,
        doomed_bytes=table._doomed.bytes,
        used_bytes=used,
        staging_bytes=table._staging_bytes,
        heap_bytes=table.alloc.heap_bytes,
        configured_bytes=table._size,
        usage=used / table._size,
        evicted_objects=table.evicted_objects,
        evicted_bytes=table.evicted_bytes,
        dropped_oom=table._drops.total,
        expired_reservations=table.expired,
        evictor_errors=evictor_errors,
        listener_failures=listener_failures,
        healthy=healthy and is_open,
    )
