"""FreeListAllocator: alignment, first fit, partial batches, coalescing, sbrk, memcheck."""

from __future__ import annotations

import pytest

from kvhive.storage.l1.allocator import FreeListAllocator, align_up

U = 4096


def test_align_up() -> None:
    assert [align_up(n, U) for n in (1, U, U + 1)] == [U, U, 2 * U]


def test_sizes_are_rounded_and_offsets_aligned() -> None:
    a = FreeListAllocator(16 * U, U)
    assert a.allocate(1) == 0
    assert a.allocate(U + 1) == U
    assert a.allocate(2048) == 3 * U
    assert a.allocated_bytes == 4 * U
    assert a.free_bytes == 12 * U
    assert a.memcheck()


def test_bad_arguments() -> None:
    a = FreeListAllocator(4 * U, U)
    for n in (0, -1):
        with pytest.raises(ValueError):
            a.allocate(n)
        with pytest.raises(ValueError):
            a.allocate_many(n, 3)
    assert a.allocate_many(U, 0) == []
    with pytest.raises(ValueError):
        FreeListAllocator(4 * U, 3000)


def test_heap_is_floored_to_alignment() -> None:
    a = FreeListAllocator(4 * U + 100, U)
    assert a.heap_bytes == 4 * U
    assert a.allocate_many(U, 10) == [0, U, 2 * U, 3 * U]


def test_first_fit_takes_lowest_block_that_fits() -> None:
    a = FreeListAllocator(16 * U, U)
    x, y, z, _w = (a.allocate(U) for _ in range(4))
    a.free(x, U)
    a.free(z, U)
    assert a.allocate(2 * U) == 4 * U  # neither one-unit hole fits two units
    assert a.allocate(U) == x
    assert a.allocate(U) == z
    assert y == U


def test_allocate_many_is_partial() -> None:
    a = FreeListAllocator(64 * U, U)
    got = a.allocate_many(U, 70)
    assert len(got) == 64
    assert got == sorted(got)
    assert a.allocate(U) is None
    a.free_many((off, U) for off in got[:60])
    assert len(a.allocate_many(U, 60)) == 60


def test_allocate_many_spans_blocks_and_skips_small_ones() -> None:
    a = FreeListAllocator(12 * U, U)
    offs = a.allocate_many(U, 12)
    a.free(offs[1], U)  # 1-unit hole: too small for 2-unit objects
    a.free_many([(offs[3], U), (offs[4], U)])  # 2-unit hole
    a.free_many((o, U) for o in offs[7:11])  # 4-unit hole
    assert a.allocate_many(2 * U, 5) == [3 * U, 7 * U, 9 * U]
    assert a.memcheck()


def test_free_coalesces_with_both_neighbours() -> None:
    a = FreeListAllocator(8 * U, U)
    offs = a.allocate_many(U, 8)
    a.free(offs[2], U)
    a.free(offs[4], U)
    assert a.free_blocks == 2
    a.free(offs[3], U)  # bridges the two holes
    assert a.free_blocks == 1
    assert a.largest_free == 3 * U
    a.free_many((o, U) for o in offs[:2] + offs[5:])
    assert a.free_blocks == 1
    assert a.largest_free == 8 * U
    assert a.allocated_bytes == 0
    assert a.memcheck()


def test_double_and_bad_free_are_refused() -> None:
    a = FreeListAllocator(8 * U, U)
    off = a.allocate(2 * U)
    assert off is not None
    a.free(off, 2 * U)
    with pytest.raises(ValueError):
        a.free(off, U)
    with pytest.raises(ValueError):
        a.free(100, U)  # misaligned
    with pytest.raises(ValueError):
        a.free(8 * U, U)  # beyond the heap
    assert a.memcheck()


def test_fragmentation_then_reuse() -> None:
    a = FreeListAllocator(64 * U, U)
    offs = a.allocate_many(U, 64)
    a.free_many((o, U) for o in offs[::2])
    assert a.free_blocks == 32
    assert a.allocate(2 * U) is None  # 32 units free, none contiguous
    assert len(a.allocate_many(U, 40)) == 32
    a.free_many((o, U) for o in offs)
    assert a.free_blocks == 1
    assert a.allocate(64 * U) == 0


def test_extend_grows_last_free_block_or_adds_one() -> None:
    a = FreeListAllocator(4 * U, U)
    a.allocate_many(U, 4)
    a.extend(6 * U)  # heap was full: a new block at the top
    assert (a.heap_bytes, a.free_blocks, a.largest_free) == (6 * U, 1, 2 * U)
    a.extend(8 * U)  # last block touches the old end: it just grows
    assert (a.free_blocks, a.largest_free) == (1, 4 * U)
    a.extend(2 * U)  # never shrinks
    assert a.heap_bytes == 8 * U
    assert a.allocate_many(U, 5) == [4 * U, 5 * U, 6 * U, 7 * U]
    assert a.memcheck()


def test_memcheck_detects_corruption() -> None:
    a = FreeListAllocator(8 * U, U)
    a.allocate(U)
    assert a.memcheck()
    a._sizes[0] += U  # simulate an accounting bug
    assert not a.memcheck()
