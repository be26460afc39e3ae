"""The L1 object table: reservations, resident objects, read locks and eviction.

Object states (one key is in at most one of STAGING and RESIDENT)::

    (absent) --reserve--> STAGING --commit--> RESIDENT --delete/evict/clear--> (absent)
                            |  \\--abort / write TTL expired + reclaimed--> (absent)
                            |\\--write TTL expired + reserve again--> STAGING (handed over)
                            |                          |
                            | forced delete/clear      | forced delete/clear while read-locked
                            v                          v
                    DOOMED (write)               DOOMED (read)
                      commit fails; commit,        the key's last live read lock released
                      abort, write TTL: freed      (unlock, release_owners, read TTL): freed

* STAGING: a write reservation of one owner with a deadline (write TTL); invisible to readers.
  One live reservation per key: a second writer gets None (the first one will provide it).
* RESIDENT: readable, content frozen.  Read locks (``locks.TTLLockTable``, read TTL) are
  counted per owner with per-owner deadlines; a live lock protects from eviction and from
  deletion without force.
* DOOMED: what a forced removal took away while someone still used its memory (a copy
  pinned by ``CopyPin``/``WorkerCopyPin``, a write-behind read, any read lock, or a writer
  still filling its reservation).  It is gone for every new lookup, lock and commit at once,
  and the key may be stored again meanwhile, but its bytes are freed only when that use
  ends.  A forced clear may drop data; it never frees memory a copy or a writer still uses.
  Doomed bytes stay in ``used_bytes`` (``doomed_objects``/``doomed_bytes`` in the stats).

Memory is byte based.  ``usage = used / configured`` where used counts resident, staging
and doomed bytes (physical, i.e. aligned) and configured is ``size_bytes`` (not the grown
heap), so a lazy arena is judged against its final size.  When ``reserve`` cannot allocate
it reclaims expired reservations (and doomed memory nobody reads any more), grows a lazy
arena, then evicts inline in policy order until the request fits, and only then drops what
is left (counted in ``dropped_oom`` and logged, rate limited).
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

Composition (one job each)::

    L1Manager   public API, the mutex, listener delivery, evictor thread, lifecycle
      |-- ObjectTable  (table.py)    the state machine above and its byte accounting
      |-- Reclaimer    (reclaim.py)  inline and background freeing of memory, quotas
      |-- EventQueue   (events.py)   ordered listener delivery, failures counted
      `-- Arena + FreeListAllocator  the bytes

Threading: every public method is thread-safe and holds the one mutex ``_mu`` for its whole
body (``view`` and ``usage`` are lock-free reads); ``ObjectTable`` and ``Reclaimer`` are only
ever called under it.  Listeners run after the mutex is released, in the global order in
which the events happened, on whichever caller thread drains the queue; they must not block.
A listener that raises is logged and counted (``L1Stats.listener_failures``).  The evictor
thread (``start``) calls ``evict_tick`` like any other caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from kvhive.keys import ObjectKey
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.storage.eviction.base import EvictionPolicy
from kvhive.storage.l1.allocator import FreeListAllocator
from kvhive.storage.l1.arena import Arena
from kvhive.storage.l1.events import EventQueue
from kvhive.storage.l1.pins import HostMemoryPinner
from kvhive.storage.l1.reclaim import Reclaimer
from kvhive.storage.l1.records import L1Params, L1Stats, Listener, Slot
from kvhive.storage.l1.table import ObjectTable, table_page, table_stats
from kvhive.storage.locks import Clock, Owner
from kvhive.storage.quota import QuotaRegistry

log = logging.getLogger(__name__)


class L1Manager:
    """The L1 tier over one arena: thread-safe façade of its parts (module docstring)."""

    def __init__(
        self,
        params: L1Params,
        *,
        policy: EvictionPolicy,
        quotas: QuotaRegistry | None = None,
        clock: Clock = time.monotonic,
        bus: EventBus = DISABLED,
        arena: Arena | None = None,
        evict_interval: float = 1.0,
    ) -> None:
        """Map the arena (``arena`` may be injected: tests use small grow steps).

        ``params`` come from the flags; ``quotas`` feed IsolatedLRU (None: every salt has
        quota 0); ``evict_interval`` is seconds of ``clock`` between background eviction
        ticks.  Raises ValueError for inconsistent values before any memory is mapped.
        """
        if evict_interval <= 0:
            raise ValueError(f"the eviction interval must be positive, got {evict_interval}")
        if arena is not None and (arena.size_bytes, arena.align) != (
            params.size_bytes,
            params.align_bytes,
        ):
            raise ValueError("injected arena does not match size_bytes / align_bytes")
        self._arena = arena or Arena(
            params.size_bytes,
            align=params.align_bytes,
            lazy=params.lazy,
            init_bytes=params.init_bytes,
            shm_name=params.shm_name,
        )
        self._size = params.size_bytes
        self._clock = clock
        self._policy = policy
        self._mu = threading.Lock()
        self._events = EventQueue()
        alloc = FreeListAllocator(self._arena.heap_bytes, params.align_bytes)
        self._table = ObjectTable(
            alloc, params, policy=policy, clock=clock, events=self._events, bus=bus
        )
        self._reclaimer = Reclaimer(
            self._table, self._arena, params, policy=policy, quotas=quotas, bus=bus
        )
        self._evictor_errors = 0  # written by the evictor thread only
        self._interval = evict_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- properties ------------------------------------------------------------------------

    @property
    def arena(self) -> Arena:
        return self._arena

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def usage(self) -> float:
        """Used bytes (resident + staging + doomed, physical) / configured size (lock-free)."""
        return self._table.alloc.allocated_bytes / self._size

    # -- write path ------------------------------------------------------------------------

    def reserve(self, keys: Sequence[ObjectKey], nbytes: int, owner: Owner) -> list[Slot | None]:
        """Reserve ``nbytes`` (logical) per key for writing, owned by ``owner``.

        Per key: a Slot, or None when the key is resident, reserved by a live writer (any
        owner, or earlier in this batch), or no memory was left after growth and inline
        eviction.  The caller owns each Slot until ``commit``/``abort`` or write-TTL expiry.
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        with self._mu:
            self._check_open()
            out = self._table.reserve(keys, nbytes, owner, self._clock(), self._reclaimer.allocate)
            ends = [slot.offset + slot.nbytes for slot in out if slot is not None]
            if ends:
                self._arena.note_used(max(ends))
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
        with self._mu:
            out = self._table.commit(slots, self._clock(), temporary=temporary, announce=announce)
        self._events.drain()
        return out

    def abort(self, slots: Sequence[Slot]) -> int:
        """Free reservations (failed copy, cancelled store), doomed ones included; returns
        how many were freed."""
        with self._mu:
            return self._table.abort(slots)

    # -- read path -------------------------------------------------------------------------

    def lock_prefix(self, rows: Iterable[Sequence[ObjectKey]], count: int, owner: Owner) -> int:
        """Read-lock the longest fully resident prefix of ``rows``; returns its length L.

        ``rows[i]`` is every key chunk i needs.  Each key of ``rows[:L]`` gets ``count`` read
        locks owned by ``owner`` (read TTL) and is touched for recency; later rows are not
        locked.  The owner must release them with ``unlock`` (or ``release_owners``).
        """
        if count < 1:
            raise ValueError(f"lock count must be >= 1, got {count}")
        with self._mu:
            return self._table.lock_prefix(rows, count, owner)

    def read_lock(
        self, keys: Sequence[ObjectKey], owner: Owner, count: int = 1
    ) -> list[Slot | None]:
        """Add ``count`` read locks of ``owner`` on each resident key; None for the others."""
        with self._mu:
            return self._table.read_lock(keys, owner, count)

    def resident(self, keys: Sequence[ObjectKey]) -> list[Slot | None]:
        """Slots of resident keys without locking (for holders that already have locks)."""
        with self._mu:
            return self._table.resident(keys)

    def unlock(self, keys: Iterable[ObjectKey], owner: Owner, count: int = 1) -> int:
        """Release up to ``count`` live read locks of ``owner`` per key; returns how many.

        Temporary objects left without any read lock are removed.
        """
        with self._mu:
            released = self._table.unlock(list(keys), owner, count)
        self._events.drain()
        return released

    def release_owners(self, match: Callable[[Owner], bool]) -> tuple[int, int]:
        """Drop every read lock and reservation of owners matching ``match`` (dead client).

        ``match`` is called (under the mutex) on every owner that holds something, so it
        must accept any Owner.  Returns (live read locks released, reservations freed).
        """
        with self._mu:
            out = self._table.release_owners(match)
        self._events.drain()
        return out

    def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Whether each key is resident (staging keys are not)."""
        with self._mu:
            return [slot is not None for slot in self._table.resident(keys)]

    def touch(self, keys: Sequence[ObjectKey]) -> None:
        """Mark resident keys as used (recency), batch rule of the policy applies."""
        with self._mu:
            self._table.touch(keys)

    # -- removal ---------------------------------------------------------------------------

    def delete(self, keys: Iterable[ObjectKey], force: bool = False) -> int:
        """Remove objects and reservations; returns how many were removed.

        Without ``force``, read-locked objects and live reservations are kept.  With it they
        are removed too: invisible at once, their memory DOOMED until its readers or writer
        are done (module docstring).
        """
        with self._mu:
            n = self._table.delete(keys, force, self._clock())
        self._events.drain()
        return n

    def clear(self, force: bool = False) -> int:
        """Remove unlocked objects and expired reservations (everything with ``force``:
        what is still read or written is DOOMED, see the module docstring)."""
        with self._mu:
            n = self._table.clear(force, self._clock())
        self._events.drain()
        return n

    # -- eviction and lifecycle ------------------------------------------------------------

    def evict_tick(self) -> int:
        """One background eviction pass (module docstring); returns objects evicted."""
        with self._mu:
            evicted = self._reclaimer.tick(self._clock())
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
            self._table.forget_all()
            self._arena.close()

    # -- pinning for DMA -------------------------------------------------------------------

    def pin_host_memory(self, pinner: HostMemoryPinner) -> None:
        """Page-lock all L1 host memory for DMA from now on (CUDA data path).

        Who: the engine, when the first CUDA engine registers (CPU-only servers never call
        it and pay nothing).  What: every region of the arena mapped now and every region
        its growth or background population maps later (``storage/l1/pins.py``), pinned in
        1 GiB regions on a background thread, so neither the caller nor this mutex waits
        for it; ``stats().pinned_bytes`` / ``pin_pending_bytes`` show progress.  A second
        call (another CUDA engine) does nothing.  A region CUDA refuses is logged, counted
        in ``pin_failures`` and left pageable: copies stay correct, only slower.  ``close``
        unpins every region before the arena is unmapped; ``pinner`` must stay usable
        until then (its owner closes it after L1).
        """
        with self._mu:
            self._check_open()
            if not self._arena.pin_host_memory(pinner):
                log.debug("L1 host memory is already being pinned")

    # -- observation -----------------------------------------------------------------------

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(event, keys)`` for "committed" and "removed" (see module docstring)."""
        with self._mu:
            self._events.add_listener(fn)

    def list_objects(self, start: int, limit: int) -> tuple[list[Slot], int]:
        """Up to ``limit`` resident slots from position ``start`` of the object table (insertion
        order) and the table size; positions shift as objects come and go (best effort paging)."""
        with self._mu:
            return table_page(self._table, start, limit)

    def stats(self) -> L1Stats:
        """A consistent snapshot (taken under the mutex)."""
        with self._mu:
            st = table_stats(
                self._table,
                evictor_errors=self._evictor_errors,
                listener_failures=self._events.failures,
                is_open=not self._closed,
            )
        pins = self._arena.pin_status()
        st.pinned_bytes = pins.pinned_bytes
        st.pin_pending_bytes = pins.pending_bytes
        st.pin_failures = pins.failures
        return st

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:  # _mu held
        if self._closed:
            raise RuntimeError("L1 is closed")

    def _evict_loop(self) -> None:  # the evictor thread
        while not self._stop.wait(self._interval):
            try:
                self.evict_tick()
            except Exception:  # task boundary: count, log, keep the loop alive
                self._evictor_errors += 1
                log.exception("L1 eviction tick failed")
