"""Populating page tables: engine segments at registration, the background prefaulter.

Faults are counted with ``getrusage(RUSAGE_THREAD)`` around writes of one byte per page
through the SIGBUS-safe copy helper (the way a retrieve writes engine pages)."""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable

import numpy as np
import pytest

from kvhive.transfer import populate as pop
from kvhive.transfer import safecopy, shm
from kvhive.transfer.populate import PAGE, PIECE_BYTES, PopulateStats, Prefaulter
from kvhive.transfer.shm import SegmentTable
from support.shm import ShmSegment, truncate

Segment = Callable[[int], ShmSegment]
SIZE = 8 << 20  # 2,048 pages


def _faults_writing_every_page(array: np.ndarray) -> int:
    offsets = np.arange(0, array.size, PAGE, dtype=np.int64)
    ones = np.ones(offsets.size, np.uint8)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    safecopy.copy_rows(array, offsets, ones, None, 1, segment="test")
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def _pages() -> int:
    return SIZE // PAGE


def test_unpopulated_mapping_faults_once_per_page(shm_segment: Segment) -> None:
    """The cost the population removes: a fresh mapping's first write faults every page."""
    seg = shm_segment(SIZE).fill_random(np.random.default_rng(0))  # the engine touched it
    table = SegmentTable(populate=False)
    try:
        m = table.acquire(seg.name, SIZE)
        assert _faults_writing_every_page(m.array) >= 0.9 * _pages()
    finally:
        table.close()


@pytest.mark.parametrize("how", ["madvise", "read-touch"])
def test_registered_segment_is_populated(
    shm_segment: Segment, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "madvise" and not pop.populate_supported():
        pytest.skip("this kernel has no MADV_POPULATE_WRITE")
    if how == "read-touch":  # the fallback for kernels without MADV_POPULATE_WRITE
        monkeypatch.setattr(shm, "populate_supported", lambda: False)
    seg = shm_segment(SIZE).fill_random(np.random.default_rng(1))
    before = bytes(seg.buf[:PAGE])
    table = SegmentTable()
    try:
        m = table.acquire(seg.name, SIZE)
        assert table.wait_populated(timeout=30)
        stats = table.populate_stats()
        assert stats.bytes_done >= SIZE and stats.failures == 0
        assert bytes(seg.buf[:PAGE]) == before  # populating never changes the engine's bytes
        assert _faults_writing_every_page(m.array) <= _pages() // 100
    finally:
        table.close()


def test_populating_a_shrunk_segment_fails_softly(shm_segment: Segment) -> None:
    """A worker may truncate its segment after registering: no SIGBUS, a failed piece."""
    seg = shm_segment(SIZE)
    table = SegmentTable(populate=False)
    try:
        m = table.acquire(seg.name, SIZE)
        truncate(seg.name, PAGE)
        assert pop.read_touch(m.address, SIZE) is False
        if pop.populate_supported():
            assert pop.populate(m.address, SIZE) is False
            assert pop.populate_read(m.address, SIZE) is False
    finally:
        table.close()


def test_release_cancels_and_close_stops(shm_segment: Segment) -> None:
    a, b = shm_segment(SIZE), shm_segment(SIZE)
    table = SegmentTable()
    table.acquire(a.name, SIZE)
    table.acquire(b.name, SIZE)
    table.release(a.name)  # waits for a piece in a's range, drops the rest: unmapping is safe
    table.close()
    table.close()
    assert not [t for t in threading.enumerate() if t.name == "kvhive-segment-populate"]


class _Recorder:
    """A fill function that records its calls and can be held inside a call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, addr: int, length: int) -> bool:
        self.calls.append((addr, length))
        self.entered.set()
        self.release.wait(10)
        return True


def test_prefaulter_cuts_ranges_into_pieces_and_reports_idle() -> None:
    fill, idle = _Recorder(), []
    pf = Prefaulter(1 << 30, "kvhive-test-prefault", fill, idle.append)
    pf.submit(0, 2 * PIECE_BYTES + PAGE)
    assert pf.wait_idle(10)
    assert fill.calls == [
        (1 << 30, PIECE_BYTES),
        ((1 << 30) + PIECE_BYTES, PIECE_BYTES),
        ((1 << 30) + 2 * PIECE_BYTES, PAGE),
    ]
    for _ in range(100):  # the thread reports, then exits
        if idle and not [t for t in threading.enumerate() if t.name == "kvhive-test-prefault"]:
            break
        threading.Event().wait(0.01)
    assert idle == [PopulateStats(2 * PIECE_BYTES + PAGE, idle[0].seconds, 0)]
    assert not [t for t in threading.enumerate() if t.name == "kvhive-test-prefault"]


def test_prefaulter_cancel_waits_for_the_piece_in_progress() -> None:
    fill = _Recorder()
    fill.release.clear()
    pf = Prefaulter(0, "kvhive-test-cancel", fill)
    pf.submit(0, 3 * PIECE_BYTES)
    assert fill.entered.wait(10)  # the first piece is being filled, held there
    done = threading.Event()

    def cancel() -> None:
        pf.cancel(0, 3 * PIECE_BYTES)
        done.set()

    th = threading.Thread(target=cancel)
    th.start()
    assert not done.wait(0.2)  # cannot return while a piece inside the range runs
    fill.release.set()
    assert done.wait(10)
    th.join()
    assert pf.wait_idle(10)
    assert fill.calls == [(0, PIECE_BYTES)]  # the queued rest was dropped
    pf.stop()
    pf.submit(0, PAGE)  # after stop: ignored
    assert fill.calls == [(0, PIECE_BYTES)]


def test_prefaulter_reports_pending_bytes_until_done() -> None:
    fill = _Recorder()
    fill.release.clear()
    pf = Prefaulter(0, "kvhive-test-pending", fill)
    assert pf.pending_bytes() == 0
    pf.submit(0, 2 * PIECE_BYTES + PAGE)
    assert fill.entered.wait(10)  # the first piece is being filled, held there
    assert pf.pending_bytes() == 2 * PIECE_BYTES + PAGE  # the piece in progress counts
    fill.release.set()
    assert pf.wait_idle(10)
    assert pf.pending_bytes() == 0
    assert pf.stats().bytes_done == 2 * PIECE_BYTES + PAGE
    pf.stop()
