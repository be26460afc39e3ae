"""The L1 host buffer: one aligned byte range, reserved at once, faulted in on demand.

Three ways to obtain it::

    lazy    anonymous private mapping of the final size (MAP_NORESERVE, instant at any
            size); the usable heap starts at init_bytes rounded up to 64 MiB granules and
            capped at size_bytes, and grow() extends it in 1 GiB steps when the manager's
            allocation fails.  The heap never exceeds size_bytes.
    eager   the same mapping with the heap equal to size_bytes from the start.
    shm     a POSIX shared-memory segment /dev/shm/lmcache_l1_pool_<name> of size_bytes,
            always eager, shared with engine-driven clients that map it by name; offsets are
            relative to the segment start.

Pages are pre-faulted in a background thread (``kvhive.transfer.populate.Prefaulter``) so start-up and
growth stay fast: all of an eager or shm arena at once, but a lazy arena only
``POPULATE_AHEAD_BYTES`` beyond the highest byte handed out so far (``note_used``), so its
memory grows with use (``--l1-init-size-gb 20`` on a 24 GiB machine takes what the cache holds,
not 20 GiB at start) while writers still find their pages populated.  Offsets handed out by
the allocator index ``Arena.array``.

Pinning for DMA (CUDA engines only, ``pin_host_memory``; ``storage/l1/pins.py``) follows the
same front: what is mapped and populated is pinned, in 1 GiB regions, in the background.

Alignment: the base of anonymous arenas is aligned to ``align`` by over-reserving
``align - 1`` bytes and skipping the unaligned head (never touched, so it costs no memory).
A shm segment must start at offset 0 for its clients, so its base is only page aligned.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sys

import numpy as np

from kvhive.errors import UnsupportedError
from kvhive.storage.l1.allocator import align_up
from kvhive.storage.l1.pins import NOT_PINNED, ArenaPins, HostMemoryPinner, PinStatus
from kvhive.transfer.populate import Prefaulter, populate_supported, touch_pages

log = logging.getLogger(__name__)

GRANULE_BYTES = 64 << 20
GROW_STEP_BYTES = 1 << 30
POPULATE_AHEAD_BYTES = 1 << 30
# Python < 3.12 lacks the constant; without it the kernel's overcommit heuristic refuses a
# lazy arena larger than RAM + swap (the seed example's 100 GiB on a 24 GiB machine).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
SHM_PREFIX = "lmcache_l1_pool_"
SHM_DIR = "/dev/shm"


def shm_segment_name(name: str) -> str:
    """Normalise ``--shm-name``: strip leading '/', add ``lmcache_l1_pool_`` unless present."""
    bare = name.lstrip("/")
    if not bare or "/" in bare or "\\" in bare or "\x00" in bare:
        raise ValueError(f"invalid shm name {name!r}")
    return bare if bare.startswith(SHM_PREFIX) else SHM_PREFIX + bare


class Arena:
    """One host buffer of ``size_bytes`` (see module docstring).

    ``grow`` is not thread-safe: the owner (``L1Manager``) calls it under its mutex.
    ``close`` is idempotent; numpy views handed out earlier keep the mapping alive (it is
    unmapped when the last view dies) but a closed shm segment is unlinked regardless.
    """

    def __init__(
        self,
        size_bytes: int,
        *,
        align: int,
        lazy: bool = False,
        init_bytes: int = 0,
        shm_name: str = "",
        granule_bytes: int = GRANULE_BYTES,
        grow_step_bytes: int = GROW_STEP_BYTES,
        prefault: bool = True,
    ) -> None:
        if size_bytes <= 0:
            raise ValueError(f"size_bytes must be positive, got {size_bytes}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        if shm_name and lazy:
            raise ValueError("a shared-memory arena cannot be lazy")
        self.size_bytes = size_bytes
        self.align = align
        self.lazy = lazy
        self.shm_segment_name = shm_segment_name(shm_name) if shm_name else ""
        self._grow_step = grow_step_bytes
        self._closed = False
        if self.shm_segment_name:
            self._mm = self._map_shm(self.shm_segment_name, size_bytes)
            pad = 0
        else:
            flags = mmap.MAP_PRIVATE | MAP_NORESERVE
            self._mm = mmap.mmap(-1, size_bytes + align - 1, flags=flags)
            pad = -_address(self._mm) % align
            _advise_huge_pages(self._mm)
        self.array: np.ndarray = np.frombuffer(self._mm, np.uint8, size_bytes, pad)
        self.base_address = _address_of(self.array)
        self.heap_bytes = (
            min(align_up(min(init_bytes, size_bytes), granule_bytes), size_bytes)
            if lazy
            else size_bytes
        )
        populating = prefault and populate_supported()
        self._prefaulter = (
            Prefaulter(self.base_address, "kvhive-l1-prefault") if populating else None
        )
        self._touch_on_grow = prefault and not populating and lazy
        self._populated = 0  # bytes from the start queued for population (lazy arenas)
        self._ahead = POPULATE_AHEAD_BYTES  # how far ahead of use; doubles when caught up
        self._pins: ArenaPins | None = None  # set by pin_host_memory (CUDA engines only)
        if lazy and self._prefaulter is not None:
            self.note_used(0)
        else:
            self._prefault(0, self.heap_bytes)

    # -- growth ----------------------------------------------------------------------------

    def grow(self, min_extra: int) -> int:
        """Extend the heap by whole steps covering ``min_extra`` bytes, capped at size.

        Returns the bytes added (0 when the heap already spans the whole arena).  Pages are
        populated in the background; only when the kernel lacks MADV_POPULATE_WRITE are the
        new pages touched here, before anyone can own them (page zeroing: up to ~1 s per GiB).
        """
        if self._closed or self.heap_bytes >= self.size_bytes:
            return 0
        steps = max(1, -(-min_extra // self._grow_step))
        old = self.heap_bytes
        self.heap_bytes = min(self.size_bytes, old + steps * self._grow_step)
        if self._prefaulter is None:
            self._prefault(old, self.heap_bytes)
        if self._pins is not None:
            self._pins.extend_to(self._pin_front())
        return self.heap_bytes - old

    def note_used(self, end: int) -> None:
        """The allocator handed out bytes up to offset ``end``: keep population of a lazy
        arena ahead of it (within the heap): ``POPULATE_AHEAD_BYTES`` at first, twice as far
        each time writes catch up with a population still running (never past the heap, so
        at most what ``--l1-init-size-gb`` asked for).  Called by the owner under its mutex;
        a no-op for other arenas and while far enough ahead."""
        if not self.lazy or self._prefaulter is None or self._closed:
            return
        if end + self._ahead // 2 <= self._populated:
            return
        if self._prefaulter.pending_bytes() > 0 and self._ahead < self.heap_bytes:
            # Writes caught up with a population still running (a burst, or a host that
            # backs fresh memory slowly): look twice as far ahead from now on, up to the
            # heap, so the next burst finds its pages populated during the idle time.
            self._ahead = min(2 * self._ahead, self.heap_bytes)
        target = min(self.heap_bytes, end + self._ahead)
        if target > self._populated:
            self._prefaulter.submit(self._populated, target)
            self._populated = target
            if self._pins is not None:
                self._pins.extend_to(target)

    def populate_status(self) -> dict[str, int | float]:
        """Background population so far: ``pending_bytes`` still to populate (stores landing
        there fault on the request path; on a VM whose host backs fresh guest memory slowly
        that is ~10-50 ms per MiB), ``populated_bytes``, ``seconds`` spent, ``failures``, and
        ``ahead_bytes``, how far ahead of use a lazy arena populates now."""
        if self._prefaulter is None:
            return {
                "pending_bytes": 0,
                "populated_bytes": 0,
                "seconds": 0.0,
                "failures": 0,
                "ahead_bytes": 0,
            }
        st = self._prefaulter.stats()
        return {
            "ahead_bytes": self._ahead if self.lazy else 0,
            "pending_bytes": self._prefaulter.pending_bytes(),
            "populated_bytes": st.bytes_done,
            "seconds": round(st.seconds, 3),
            "failures": st.failures,
        }

    def wait_prefault(self, timeout: float | None = None) -> bool:
        """Block until queued pre-faulting is done (tests, benchmarks); True when idle."""
        return self._prefaulter is None or self._prefaulter.wait_idle(timeout)

    def _prefault(self, start: int, end: int) -> None:
        if self._prefaulter is not None:
            self._prefaulter.submit(start, end)
        elif self._touch_on_grow and start > 0:
            touch_pages(self.array, start, end)  # destructive: only before publication
        # Eager without MADV_POPULATE_WRITE: pages fault on first write (touching them in
        # the background would race with writers, as the whole heap is live at once).

    # -- pinning for DMA (kvhive.storage.l1.pins) -----------------------------------------

    def pin_host_memory(self, pinner: HostMemoryPinner) -> bool:
        """Pin the arena's memory for DMA with ``pinner`` from now on (module docstring of
        ``storage/l1/pins.py``): what is mapped now, and what growth or population maps
        later, in the background.  Called by the owner under its mutex; False (nothing
        done) when already pinning or closed."""
        if self._closed or self._pins is not None:
            return False
        self._pins = ArenaPins(self.base_address, pinner)
        self._pins.extend_to(self._pin_front())
        return True

    def pin_status(self) -> PinStatus:
        """Pinned bytes, bytes still to pin, refused regions, seconds (all 0 if not pinning)."""
        return NOT_PINNED if self._pins is None else self._pins.status()

    def wait_pinned(self, timeout: float | None = None) -> bool:
        """Block until pinning caught up with the front (tests, benchmarks); True when so."""
        return self._pins is None or self._pins.wait(timeout)

    def _pin_front(self) -> int:
        # A lazy arena populated in the background is pinned as far as it is populated
        # (pinning faults pages in: the heap's unused part would then cost memory).
        return self._populated if self.lazy and self._prefaulter is not None else self.heap_bytes

    # -- shared memory ---------------------------------------------------------------------

    @staticmethod
    def _map_shm(name: str, size: int) -> mmap.mmap:
        # os + mmap instead of multiprocessing.shared_memory: its resource_tracker would
        # unlink the segment (and warn) when this process exits, behind our back.
        if not os.path.isdir(SHM_DIR):
            raise UnsupportedError(f"shared-memory L1 needs {SHM_DIR}")
        path = os.path.join(SHM_DIR, name)
        try:
            os.unlink(path)
            log.warning("removed stale shared-memory segment %s", name)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop pre-faulting, unlink the shm segment and drop the mapping (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._prefaulter is not None:
            self._prefaulter.stop()
        if self._pins is not None:
            self._pins.close()  # unpinned before the mapping can go away
        if self.shm_segment_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.shm_segment_name))
        self.array = np.empty(0, np.uint8)
        self.heap_bytes = 0
        try:
            self._mm.close()
        except BufferError:
            # Views still exist; the mapping goes away with the last of them.
            log.debug("arena views still alive at close; unmapping deferred to GC")

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _advise_huge_pages(mm: mmap.mmap) -> None:
    """Ask for transparent huge pages on the anonymous arena (``MADV_HUGEPAGE``; a no-op
    where THP is off).  With 4 KiB pages a 32 MiB store or retrieve walks 8,192 page
    translations on the L1 side alone; numpy gets huge pages for its own large buffers the
    same way, which is why an in-process copy ran faster than the same copy into L1."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        mm.madvise(advice)
    except OSError as exc:  # EINVAL on kernels built without THP
        log.debug("MADV_HUGEPAGE on the L1 arena refused: %s", exc)


def _address_of(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def _address(mm: mmap.mmap) -> int:
    view = np.frombuffer(mm, np.uint8, 1)
    try:
        return _address_of(view)
    finally:
        del view
