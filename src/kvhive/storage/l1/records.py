"""Records shared by the L1 object table and its users: slots, stats, events."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from typing import Literal

from kvhive.keys import ObjectKey

L1Event = Literal["committed", "removed"]
Listener = Callable[[L1Event, list[ObjectKey]], None]


@dataclass(frozen=True, slots=True, eq=False)
class Slot:
    """One object's place in the arena: ``nbytes`` logical bytes at byte ``offset``.

    The physical footprint is ``nbytes`` rounded up to the arena alignment.  Slots compare by
    identity: a reservation is matched by the very Slot object ``reserve`` returned, so a
    writer whose expired reservation was handed over cannot commit someone else's buffer.
    """

    key: ObjectKey
    offset: int
    nbytes: int


@dataclass(slots=True)
class Reservation:
    """A write reservation: invisible to readers, owned by ``owner`` until ``deadline``."""

    slot: Slot
    owner: Hashable
    deadline: float


@dataclass(slots=True)
class L1Stats:
    """A consistent snapshot of L1 (sizes in bytes, physical, i.e. aligned)."""

    objects: int
    temporary_objects: int  # loaded from L2 for one reader set (prefetch policy default)
    staging_objects: int
    read_locked_objects: int
    used_bytes: int  # resident + staging
    staging_bytes: int
    heap_bytes: int  # grown part of a lazy arena
    configured_bytes: int
    usage: float  # used_bytes / configured_bytes
    evicted_objects: int
    evicted_bytes: int
    dropped_oom: int  # keys refused by reserve for lack of memory
    expired_reservations: int  # write reservations reclaimed after their TTL
    evictor_errors: int
    healthy: bool  # allocator memcheck passed and byte accounting agrees

    def to_dict(self) -> dict[str, int | float | bool]:
        return asdict(self)
