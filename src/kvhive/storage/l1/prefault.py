"""Background pre-faulting of arena pages.

Pre-faulting moves the page-fault cost (kernel zeroing, up to ~1 s per GiB) off the store
path, the CPU-only stand-in for the reference's pinning.  ``madvise(MADV_POPULATE_WRITE)``
(Linux >= 5.14) does it without touching contents, so it may run on pages that are already
handed out and being written: it is safe in a background thread.  Without it, the only way
is to write a byte per page, which is destructive, so ``touch_pages`` is only for ranges
nobody owns yet.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import sys
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # value is Linux ABI
PIECE_BYTES = 64 << 20  # one madvise call; bounds how long stop() waits


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def populate(addr: int, length: int) -> bool:
    """``madvise(MADV_POPULATE_WRITE)`` on ``[addr, addr+length)``; False if unsupported.

    ctypes releases the GIL for the call, so other threads keep running meanwhile.
    """
    fn = _libc_madvise()
    return fn is not None and fn(addr, length, _MADV_POPULATE_WRITE) == 0


@functools.cache
def populate_supported() -> bool:
    """Whether this kernel honours MADV_POPULATE_WRITE (probed once on a scratch page)."""
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


class Prefaulter:
    """One daemon thread that populates queued ``(start, end)`` ranges of a mapping.

    ``base`` is the address of byte 0 of the ranges.  Thread-safe; ``stop()`` joins the
    thread and must be called before the mapping is released.
    """

    def __init__(self, base: int, name: str = "kvhive-l1-prefault") -> None:
        self._base = base
        self._name = name
        self._queue: deque[tuple[int, int]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, start: int, end: int) -> None:
        """Queue ``[start, end)`` (bytes from base); starts the thread on first use."""
        start -= start % PAGE  # madvise wants page-aligned ranges; populating more is harmless
        if end <= start:
            return
        with self._cv:
            if self._stopping:
                return
            self._queue.append((start, end))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is drained; True when idle (for tests and shutdown)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self) -> None:
        """Drop pending work and join the thread (waits for at most one piece)."""
        with self._cv:
            self._stopping = True
            self._queue.clear()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
                self._cv.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                start, end = self._queue.popleft()
                piece_end = min(end, start + PIECE_BYTES)
                if piece_end < end:  # re-queue the rest first so stop() can cut in
                    self._queue.appendleft((piece_end, end))
                self._busy = True
            if not populate(self._base + start, piece_end - start):
                log.debug("MADV_POPULATE_WRITE failed at +%d; pages fault on first use", start)
