"""DoomedMemory: arena memory removed by force while still in use, freed when the use ends.

Two kinds (see :mod:`kvhive.storage.l1.table`): read-locked objects, per key, freed once no
live read lock on the key remains; and live reservations (matched by Slot identity), freed
by their writer's commit (which fails) or abort, by their owner's release, or by their
write TTL.  ``bytes`` counts the physical (aligned) bytes held, for the table's exact
accounting.

Not thread-safe: called by the :class:`~kvhive.storage.l1.table.ObjectTable` under the
L1 mutex.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvhive.keys import ObjectKey
from kvhive.storage.l1.allocator import FreeListAllocator
from kvhive.storage.l1.records import Reservation, Slot


class DoomedMemory:
    """Doomed reads and writes, and the bytes they hold (module docstring)."""

    __slots__ = ("_alloc", "_reads", "_writes", "bytes")

    def __init__(self, alloc: FreeListAllocator) -> None:
        self._alloc = alloc
        self._reads: dict[ObjectKey, list[Slot]] = {}  # read-locked objects, per key
        self._writes: dict[Slot, Reservation] = {}  # live reservations (Slot identity)
        self.bytes = 0

    @property
    def objects(self) -> int:
        return sum(map(len, self._reads.values())) + len(self._writes)

    def add_reads(self, slots: Iterable[Slot]) -> None:
        """Resident slots removed while read-locked."""
        for slot in slots:
            self._reads.setdefault(slot.key, []).append(slot)
            self.bytes += self._alloc.physical(slot.nbytes)

    def add_write(self, res: Reservation) -> None:
        """A live reservation removed while its writer may still write."""
        self.bytes += self._alloc.physical(res.slot.nbytes)
        self._writes[res.slot] = res

    def free_write(self, slot: Slot) -> bool:
        """Free ``slot`` if it is a doomed reservation; True when it was."""
        if not self._writes:
            return False
        res = self._writes.pop(slot, None)
        if res is None:
            return False
        phys = self._alloc.physical(slot.nbytes)
        self._alloc.free(slot.offset, phys)
        self.bytes -= phys
        return True

    def free_writes(self, match: Callable[[Reservation], bool]) -> int:
        """Free the doomed reservations ``match`` accepts; returns how many."""
        if not self._writes:
            return 0
        slots = [s for s, r in self._writes.items() if match(r)]
        for slot in slots:
            self.free_write(slot)
        return len(slots)

    def free_unread(
        self, keys: Iterable[ObjectKey] | None, is_locked: Callable[[ObjectKey], bool]
    ) -> None:
        """Free the doomed slots of ``keys`` (None: every key) no live read lock protects."""
        if not self._reads:
            return
        for key in list(self._reads) if keys is None else keys:
            slots = self._reads.get(key)
            if slots is None or is_locked(key):
                continue
            del self._reads[key]
            for slot in slots:
                phys = self._alloc.physical(slot.nbytes)
                self._alloc.free(slot.offset, phys)
                self.bytes -= phys

    def forget_all(self) -> None:
        """Drop everything without freeing (L1 is closing)."""
        self._reads.clear()
        self._writes.clear()
        self.bytes = 0
