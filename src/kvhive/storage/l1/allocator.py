"""First-fit allocator over an address-sorted free list.

The heap is ``[0, heap_bytes)`` in bytes, relative to the arena base.  Free space is a list of
``(offset, size)`` blocks sorted by offset and always fused with their neighbours::

    offset 0                                                          heap_bytes
    |##used##|....free....|##used##|###used###|.......free.......|##|...free...|

Every size is rounded up to ``align`` (a power of two), so every offset handed out is a
multiple of ``align``.  There is no compaction: in practice one layout fills L1 with equal
slots and the heap behaves as a pool.

Not thread-safe: the owner (``L1Manager``) serialises every call under its own mutex.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable


def align_up(n: int, align: int) -> int:
    """Smallest multiple of ``align`` (a power of two) that is >= ``n``."""
    return (n + align - 1) & ~(align - 1)


class FreeListAllocator:
    """Hands out aligned byte ranges of a growable heap; see the module docstring."""

    __slots__ = ("_align", "_heap", "_starts", "_sizes", "_allocated")

    def __init__(self, heap_bytes: int, align: int) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        if heap_bytes < 0:
            raise ValueError(f"heap_bytes must be >= 0, got {heap_bytes}")
        self._align = align
        self._heap = heap_bytes & ~(align - 1)  # a ragged tail can never hold an aligned unit
        # Parallel lists keep bisect on plain ints (no tuple allocation per probe).
        self._starts: list[int] = [0] if self._heap else []
        self._sizes: list[int] = [self._heap] if self._heap else []
        self._allocated = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def align(self) -> int:
        return self._align

    @property
    def heap_bytes(self) -> int:
        """Usable heap in bytes (a multiple of ``align``)."""
        return self._heap

    @property
    def allocated_bytes(self) -> int:
        return self._allocated

    @property
    def free_bytes(self) -> int:
        return self._heap - self._allocated

    @property
    def largest_free(self) -> int:
        """Size in bytes of the largest free block (O(blocks); for stats, not hot paths)."""
        return max(self._sizes, default=0)

    @property
    def free_blocks(self) -> int:
        return len(self._starts)

    def physical(self, nbytes: int) -> int:
        """Bytes actually occupied by an object of ``nbytes`` logical bytes."""
        return align_up(nbytes, self._align)

    # -- allocation ------------------------------------------------------------------------

    def allocate(self, n: int) -> int | None:
        """Reserve ``align_up(n)`` bytes at the lowest fitting offset; None when nothing fits."""
        got = self.allocate_many(n, 1)
        return got[0] if got else None

    def allocate_many(self, unit: int, count: int) -> list[int]:
        """Cut up to ``count`` units of ``align_up(unit)`` bytes, lowest addresses first.

        PARTIAL by contract: returns as many offsets as fit (possibly fewer than ``count``,
        possibly none), in increasing address order.
        """
        if unit <= 0:
            raise ValueError(f"allocation size must be positive, got {unit}")
        if count <= 0:
            return []
        unit = align_up(unit, self._align)
        out: list[int] = []
        starts, sizes = self._starts, self._sizes
        i = 0
        while i < len(starts) and len(out) < count:
            size = sizes[i]
            if size < unit:
                i += 1
                continue
            take = min(size // unit, count - len(out))
            start = starts[i]
            out.extend(range(start, start + take * unit, unit))
            if take * unit == size:
                del starts[i], sizes[i]  # block used up; i now names the next block
            else:
                starts[i] = start + take * unit  # stays below the next block: order holds
                sizes[i] = size - take * unit
                i += 1
        self._allocated += len(out) * unit
        return out

    # -- release ---------------------------------------------------------------------------

    def free(self, offset: int, size: int) -> None:
        """Return ``[offset, offset + align_up(size))``, fusing with free neighbours.

        Raises ValueError for a misaligned, out-of-heap or already free range (double free).
        """
        size = align_up(size, self._align)
        if size <= 0 or offset % self._align or offset < 0 or offset + size > self._heap:
            raise ValueError(f"bad free of [{offset}, +{size}) in heap of {self._heap}")
        starts, sizes = self._starts, self._sizes
        i = bisect_right(starts, offset)  # blocks [0, i) start at or below offset
        if i and starts[i - 1] + sizes[i - 1] > offset:
            raise ValueError(f"double free at offset {offset}")
        if i < len(starts) and offset + size > starts[i]:
            raise ValueError(f"double free overlapping offset {starts[i]}")
        left = i > 0 and starts[i - 1] + sizes[i - 1] == offset
        right = i < len(starts) and offset + size == starts[i]
        if left and right:
            sizes[i - 1] += size + sizes[i]
            del starts[i], sizes[i]
        elif left:
            sizes[i - 1] += size
        elif right:
            starts[i] = offset
            sizes[i] += size
        else:
            starts.insert(i, offset)
            sizes.insert(i, size)
        self._allocated -= size

    def free_many(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Free several ``(offset, size)`` ranges; runs of neighbours are fused first."""
        run_start = run_end = -1
        for offset, size in sorted(ranges):
            end = offset + align_up(size, self._align)
            if offset == run_end:
                run_end = end
                continue
            if run_end >= 0:
                self.free(run_start, run_end - run_start)
            run_start, run_end = offset, end
        if run_end >= 0:
            self.free(run_start, run_end - run_start)

    # -- growth and checks -----------------------------------------------------------------

    def extend(self, new_heap_bytes: int) -> None:
        """sbrk: grow the heap to ``new_heap_bytes`` (floored to ``align``); never shrinks."""
        new_heap = new_heap_bytes & ~(self._align - 1)
        if new_heap <= self._heap:
            return
        extra = new_heap - self._heap
        if self._starts and self._starts[-1] + self._sizes[-1] == self._heap:
            self._sizes[-1] += extra
        else:
            self._starts.append(self._heap)
            self._sizes.append(extra)
        self._heap = new_heap

    def memcheck(self) -> bool:
        """True when free + allocated == heap and blocks are sorted, aligned, disjoint and fused."""
        prev_end = -1
        total = 0
        for start, size in zip(self._starts, self._sizes, strict=True):
            if size <= 0 or start % self._align or size % self._align:
                return False
            if start <= prev_end:  # overlap, or touching neighbours left unfused
                return False
            prev_end = start + size
            total += size
        return prev_end <= self._heap and total + self._allocated == self._heap
