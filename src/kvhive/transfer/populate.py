"""Populating page tables ahead of use: the L1 arena and the engines' KV segments.

A page of a mapping costs a fault the first time this process touches it (~1 us for a
shared-memory page, more when the kernel must zero a new one).  On the request path that
is 8,192 faults per 32 MiB chunk: a retrieve into blocks of an engine's KV cache that the
server never wrote ran at a third of its warm speed.  So kvhive populates its mappings
before requests need them:

* the **L1 arena** at start-up and after each growth (``storage/l1/arena.py``);
* every **engine segment** when a registration maps it (``transfer/shm.py``).

``madvise(MADV_POPULATE_WRITE)`` / ``MADV_POPULATE_READ`` (Linux >= 5.14) fill the page
tables without touching contents, so they are safe on pages that are in use: they run in
the background, one piece of :data:`PIECE_BYTES` at a time, while requests proceed (a
request that reaches an unpopulated page simply faults it, as before).  The arena, private
anonymous memory, needs WRITE (a read would map the shared zero page).  Engine segments get
READ: on tmpfs a shared mapping needs no write notification, so a read-populated entry is
already writable (measured: 0 faults writing every page afterwards,
``tests/unit/transfer/test_transfer_populate.py``), at half WRITE's cost.  Pieces are small
because the call holds the process's mmap lock: a 64 MiB piece stalled other threads'
``mmap``/``munmap`` (the registration mapping its next segment, numpy's large temporaries)
for ~15 ms, a 4 MiB piece for ~1 ms.  On a segment the engine shrank under us the call fails
with ``EFAULT`` instead of raising SIGBUS, and the pages are left to fault.  Without it:

* :func:`read_touch` reads one byte per page through the SIGBUS-safe copy helper.  On
  tmpfs a read fault maps a shared page writable, so this is equivalent for the engines'
  segments, and harmless to concurrent writers.
* :func:`touch_pages` writes a zero byte per page: destructive, only for arena ranges
  nobody owns yet.

Cost measured on the dev box (``benchmarks/populate_cost.py``): ~0.14 s per GiB of engine
segments, in the background; the registration itself waits ~1 ms.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvhive.transfer import safecopy

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # values are Linux ABI
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
PIECE_BYTES = 4 << 20  # one madvise call: bounds mmap-lock stalls and stop()/cancel() waits


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def populate(addr: int, length: int) -> bool:
    """``madvise(MADV_POPULATE_WRITE)`` on ``[addr, addr+length)``; False if it failed
    (unsupported, or a page that would raise SIGBUS).

    ctypes releases the GIL for the call, so other threads keep running meanwhile.
    """
    fn = _libc_madvise()
    return fn is not None and fn(addr, length, _MADV_POPULATE_WRITE) == 0


def populate_read(addr: int, length: int) -> bool:
    """``madvise(MADV_POPULATE_READ)`` on ``[addr, addr+length)`` (see the module doc for
    why this suffices for shared tmpfs pages); False if it failed."""
    fn = _libc_madvise()
    return fn is not None and fn(addr, length, _MADV_POPULATE_READ) == 0


@functools.cache
def populate_supported() -> bool:
    """Whether this kernel honours MADV_POPULATE_WRITE, and so MADV_POPULATE_READ (both came
    in Linux 5.14; probed once on a scratch page)."""
    probe = mmap.mmap(-1, PAGE)
    view = np.frombuffer(probe, dtype=np.uint8)
    try:
        return populate(view.ctypes.data, PAGE)
    finally:
        del view
        probe.close()


def touch_pages(array: np.ndarray, start: int, end: int) -> None:
    """Fault in ``array[start:end]`` by writing one zero byte per page (DESTRUCTIVE)."""
    first = start + (-start % PAGE)
    array[first:end:PAGE] = 0


def read_touch(addr: int, length: int) -> bool:
    """Fault in ``[addr, addr+length)`` by reading one byte per page through the SIGBUS-safe
    copy helper; False when a page raised SIGBUS (the rest is left to fault on use).

    The range must stay mapped for the call (the caller's contract, as for :func:`populate`).
    """
    if length <= 0 or not safecopy.available():
        return False
    src = np.frombuffer(memoryview((ctypes.c_char * length).from_address(addr)).cast("B"), np.uint8)
    offsets = np.arange(0, length, PAGE, dtype=np.int64)
    scratch = np.empty(offsets.size, np.uint8)
    try:
        safecopy.copy_rows(scratch, None, src, offsets, 1, segment="(populate)")
    except Exception:  # noqa: BLE001 - TransferFailed: a shrunk segment, left to fault
        return False
    return True


@dataclass(frozen=True, slots=True)
class PopulateStats:
    """What a :class:`Prefaulter` has done so far."""

    bytes_done: int
    seconds: float
    failures: int


class Prefaulter:
    """A background thread that populates queued byte ranges ``[start, end)`` (offsets from
    ``base``) with ``fill(address, length)``, one :data:`PIECE_BYTES` piece at a time.

    The thread starts on the first :meth:`submit` and exits when the queue is empty (an
    idle prefaulter holds no thread).  Contract: a range must stay mapped until it is done,
    cancelled (:meth:`cancel`, which waits for the piece in progress) or the prefaulter is
    stopped (:meth:`stop`, which waits too): callers cancel or stop before they unmap.
    Thread-safe.
    """

    def __init__(
        self,
        base: int,
        name: str = "kvhive-prefault",
        fill: Callable[[int, int], bool] = populate,
        on_idle: Callable[[PopulateStats], None] | None = None,
    ) -> None:
        """``on_idle`` is called (on the prefaulter's thread, no lock held) each time the
        queue drains without a stop, with the totals so far."""
        self._base = base
        self._name = name
        self._fill = fill
        self._on_idle = on_idle
        self._queue: deque[tuple[int, int]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._piece: tuple[int, int] | None = None  # the range being filled now
        self._thread: threading.Thread | None = None
        self._bytes = 0
        self._seconds = 0.0
        self._failures = 0

    def submit(self, start: int, end: int) -> None:
        """Queue ``[start, end)``; starts the thread if none is running."""
        start -= (self._base + start) % PAGE  # madvise wants page-aligned ranges
        if end <= start:
            return
        with self._cv:
            if self._stopping:
                return
            self._queue.append((start, end))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def cancel(self, start: int, end: int) -> None:
        """Drop the queued parts of ``[start, end)`` and wait until no piece inside it is
        being filled; afterwards the range may be unmapped."""
        with self._cv:
            kept: deque[tuple[int, int]] = deque()
            for a, b in self._queue:
                if a < start:
                    kept.append((a, min(b, start)))
                if b > end:
                    kept.append((max(a, end), b))
            self._queue = kept
            self._cv.wait_for(lambda: not _overlaps(self._piece, start, end))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is drained; True when idle (for tests and benchmarks)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and self._piece is None, timeout)

    def stop(self) -> None:
        """Drop pending work and join the thread (waits for at most one piece)."""
        with self._cv:
            self._stopping = True
            self._queue.clear()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def stats(self) -> PopulateStats:
        with self._cv:
            return PopulateStats(self._bytes, self._seconds, self._failures)

    def pending_bytes(self) -> int:
        """Bytes queued or being filled now (0 when idle)."""
        with self._cv:
            piece = self._piece
            return sum(b - a for a, b in self._queue) + (piece[1] - piece[0] if piece else 0)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._piece = None
                self._cv.notify_all()
                if self._stopping or not self._queue:
                    self._thread = None
                    drained = not self._stopping
                    totals = PopulateStats(self._bytes, self._seconds, self._failures)
                    break
                start, end = self._queue.popleft()
                piece_end = min(end, start + PIECE_BYTES)
                if piece_end < end:  # re-queue the rest first so stop()/cancel() can cut in
                    self._queue.appendleft((piece_end, end))
                self._piece = (start, piece_end)
            t0 = time.perf_counter()
            ok = self._fill(self._base + start, piece_end - start)
            with self._cv:
                self._seconds += time.perf_counter() - t0
                if ok:
                    self._bytes += piece_end - start
                else:
                    self._failures += 1
            if not ok:
                log.debug("%s: populating +%d failed; pages fault on first use", self._name, start)
        if drained and self._on_idle is not None:
            self._on_idle(totals)


def _overlaps(piece: tuple[int, int] | None, start: int, end: int) -> bool:
    return piece is not None and piece[0] < end and start < piece[1]
