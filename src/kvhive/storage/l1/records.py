"""Records shared by the L1 object table and its users: params, slots, stats, events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from kvhive.keys import ObjectKey
from kvhive.storage.locks import Owner

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
    owner: Owner
    deadline: float


@dataclass(frozen=True, slots=True)
class L1Params:
    """L1 sizing and timing, resolved from the ``--l1-*`` and ``--eviction-*`` flags.

    Every field is required: the defaults belong to the flags (``config/``), not here.  Sizes
    in bytes, TTLs in seconds of the L1 clock.  Raises ValueError on inconsistent values, at
    construction and before any memory is mapped.
    """

    size_bytes: int  # configured arena size; usage is judged against it
    align_bytes: int  # allocation unit (a power of two)
    lazy: bool  # grow the arena on demand, starting at ``init_bytes``
    init_bytes: int
    write_ttl: float  # lifetime of a write reservation
    read_ttl: float  # lifetime of a read lock
    watermark: float  # usage in (0, 1] that starts background eviction
    eviction_ratio: float  # share of used bytes one background pass frees, in [0, 1]
    shm_name: str  # POSIX shared-memory name of the arena; "" for private memory

    def __post_init__(self) -> None:
        if self.size_bytes <= 0:
            raise ValueError(f"L1 size must be positive, got {self.size_bytes}")
        if not 0.0 < self.watermark <= 1.0 or not 0.0 <= self.eviction_ratio <= 1.0:
            raise ValueError(
                f"bad watermark {self.watermark} / eviction_ratio {self.eviction_ratio}"
            )
        if min(self.write_ttl, self.read_ttl) <= 0:
            raise ValueError("L1 TTLs must be positive")


@dataclass(slots=True)
class L1Stats:
    """A consistent snapshot of L1 (sizes in bytes, physical, i.e. aligned)."""

    objects: int
    temporary_objects: int  # loaded from L2 for one reader set (prefetch policy default)
    staging_objects: int
    read_locked_objects: int  # keys with a live read lock (doomed ones included)
    doomed_objects: int  # removed by force while read or written; freed when that ends
    doomed_bytes: int
    used_bytes: int  # resident + staging + doomed
    staging_bytes: int
    heap_bytes: int  # grown part of a lazy arena
    configured_bytes: int
    usage: float  # used_bytes / configured_bytes
    evicted_objects: int
    evicted_bytes: int
    dropped_oom: int  # keys refused by reserve for lack of memory
    expired_reservations: int  # write reservations reclaimed after their TTL
    evictor_errors: int
    listener_failures: int  # L1 event listeners (write-behind feed) that raised
    healthy: bool  # allocator memcheck passed and byte accounting agrees
    # pinning for DMA (L1Manager.pin_host_memory, CUDA engines only; 0 otherwise)
    pinned_bytes: int = 0  # page-locked arena bytes
    pin_pending_bytes: int = 0  # below the pin front, not pinned yet
    pin_failures: int = 0  # regions CUDA refused (they stay pageable: slower copies)

    def to_dict(self) -> dict[str, int | float | bool]:
        return asdict(self)
