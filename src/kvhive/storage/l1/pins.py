"""Pinning the L1 arena for DMA: a front that follows the arena's mapped-and-used memory.

Contract (``L1Manager.pin_host_memory``): the engine calls it when the first CUDA engine
registers, with a pinner (``kvhive.transfer.cuda.pinning.HostPinner``).  From then on the
arena pins ``[0, front)`` where the front is the heap (eager and shm arenas: the whole
arena) or, for a lazy arena populated in the background, its populate front, and it moves
the front whenever the arena grows or populates further.  Pinning runs on a background
thread, one region of at most :data:`PIN_REGION_BYTES` per call (never page by page), so
neither the registration nor the L1 mutex waits for it; until a region is pinned, copies
into it run from pageable memory (correct, slower).  A region CUDA refuses is logged,
counted (``pin_failures``) and left pageable; the front moves on.  Closing L1 stops the
thread and unpins every region before the arena is unmapped.  CPU-only servers never call
it: the arena then holds no :class:`ArenaPins` and its hooks cost one ``is None`` test.

A copy whose host range spans two regions is still correct; the driver may treat it as
pageable (regions are large and aligned to the arena start, so most chunks fall inside one).
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

PIN_REGION_BYTES = 1 << 30


class HostMemoryPinner(Protocol):
    """What L1 needs of a pinner (``HostPinner``): pin a range (False: refused, stays
    pageable) and unpin the range pinned at an address."""

    def pin(self, addr: int, nbytes: int) -> bool: ...

    def unpin(self, addr: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class PinStatus:
    """Pinning so far: bytes pinned, bytes below the front still to pin, regions CUDA
    refused, seconds spent pinning."""

    pinned_bytes: int
    pending_bytes: int
    failures: int
    seconds: float


NOT_PINNED = PinStatus(0, 0, 0, 0.0)


@dataclass(frozen=True, slots=True)
class PinnedRegion:
    """``nbytes`` pinned at arena offset ``offset``."""

    offset: int
    nbytes: int


class ArenaPins:
    """Pins ``[0, front)`` of the memory at ``base`` in regions, on a thread of its own.

    ``extend_to`` moves the front (never back) and returns at once; the thread starts when
    there is work and exits when the front is reached.  Thread-safe.  The memory must stay
    mapped until :meth:`close` returned.
    """

    def __init__(
        self,
        base: int,
        pinner: HostMemoryPinner,
        *,
        region_bytes: int | None = None,
        name: str = "kvhive-l1-pin",
    ) -> None:
        """``region_bytes``: bytes per pin call (None: :data:`PIN_REGION_BYTES`)."""
        region_bytes = PIN_REGION_BYTES if region_bytes is None else region_bytes
        if region_bytes <= 0 or region_bytes % mmap.PAGESIZE:
            raise ValueError(f"region size must be a positive multiple of a page: {region_bytes}")
        self._base = base
        self._pinner = pinner
        self._region = region_bytes
        self._name = name
        self._cv = threading.Condition()
        self._front = 0  # pin up to here
        self._done = 0  # attempted up to here (pinned or refused)
        self._busy = False  # a region is being pinned now
        self._regions: list[PinnedRegion] = []
        self._failures = 0
        self._seconds = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False

    def extend_to(self, end: int) -> None:
        """Pin up to offset ``end`` (rounded up to a page) from now on."""
        end += -end % mmap.PAGESIZE
        with self._cv:
            if self._closed or end <= self._front:
                return
            self._front = end
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything below the front was attempted; True when so."""
        with self._cv:
            return self._cv.wait_for(lambda: self._done >= self._front and not self._busy, timeout)

    def status(self) -> PinStatus:
        with self._cv:
            return PinStatus(
                sum(r.nbytes for r in self._regions),
                self._front - self._done,
                self._failures,
                round(self._seconds, 3),
            )

    def close(self) -> None:
        """Stop (waits for the region being pinned) and unpin every region (idempotent)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cv:
            regions, self._regions = self._regions, []
        for r in regions:
            if not self._pinner.unpin(self._base + r.offset):
                log.debug("%s: unpinning +%d refused", self._name, r.offset)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
                if self._closed or self._done >= self._front:
                    self._thread = None
                    return
                start = self._done
                end = min(self._front, start + self._region)
                self._busy = True
            t0 = time.perf_counter()
            try:
                ok = self._pinner.pin(self._base + start, end - start)
            except Exception:  # thread boundary: count, leave the region pageable
                log.exception("%s: pinning +%d failed", self._name, start)
                ok = False
            with self._cv:
                self._seconds += time.perf_counter() - t0
                self._done = end
                if ok:
                    self._regions.append(PinnedRegion(start, end - start))
                else:
                    self._failures += 1
