"""Arena: aligned reservation, lazy growth, eager heap, POSIX shared memory."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from kvhive.storage.l1 import arena as arena_mod
from kvhive.storage.l1.arena import Arena, shm_segment_name

MiB = 1 << 20


def test_eager_base_is_aligned_and_heap_is_full() -> None:
    with Arena(3 * MiB, align=2 * MiB) as a:
        assert a.base_address % (2 * MiB) == 0
        assert a.heap_bytes == a.size_bytes == 3 * MiB
        assert a.array.dtype == np.uint8 and a.array.size == 3 * MiB
        a.array[-1] = 7
        assert a.array[-1] == 7
        assert a.wait_prefault(timeout=30)
        assert a.grow(MiB) == 0  # eager: nothing to grow


def test_lazy_starts_at_rounded_init_and_grows_in_steps() -> None:
    a = Arena(
        8 * MiB, align=4096, lazy=True, init_bytes=1, granule_bytes=MiB, grow_step_bytes=2 * MiB
    )
    try:
        assert a.heap_bytes == MiB  # 1 byte rounds up to one granule
        assert a.grow(1) == 2 * MiB
        assert a.heap_bytes == 3 * MiB
        assert a.grow(3 * MiB) == 4 * MiB  # two steps cover 3 MiB
        assert a.grow(10 * MiB) == MiB  # capped at the size
        assert (a.heap_bytes, a.grow(1)) == (8 * MiB, 0)
        a.array[a.heap_bytes - 1] = 1
    finally:
        a.close()


def test_lazy_init_is_capped_at_size() -> None:
    with Arena(3 * MiB, align=4096, lazy=True, init_bytes=100 * MiB, granule_bytes=2 * MiB) as a:
        assert a.heap_bytes == 3 * MiB


def test_big_lazy_arena_reserves_instantly() -> None:
    with Arena(16 << 30, align=4096, lazy=True, init_bytes=1) as a:
        assert a.size_bytes == 16 << 30
        assert a.heap_bytes == 64 * MiB
        a.array[a.heap_bytes - 1] = 3
        assert a.array[a.heap_bytes - 1] == 3


def test_grow_touches_pages_when_populate_is_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    touched: list[tuple[int, int]] = []
    monkeypatch.setattr(arena_mod, "populate_supported", lambda: False)
    monkeypatch.setattr(arena_mod, "touch_pages", lambda _arr, s, e: touched.append((s, e)))
    with Arena(
        4 * MiB, align=4096, lazy=True, init_bytes=MiB, granule_bytes=MiB, grow_step_bytes=MiB
    ) as a:
        assert touched == []  # the initial heap is never written behind anyone's back
        a.grow(1)
        assert touched == [(MiB, 2 * MiB)]


def test_close_is_idempotent_and_views_stay_valid() -> None:
    a = Arena(MiB, align=4096)
    view = a.array[:16]
    a.close()
    a.close()
    view[0] = 5  # the mapping lives on with its last view
    assert view[0] == 5
    assert a.heap_bytes == 0


def test_shm_name_normalisation() -> None:
    assert shm_segment_name("/abc") == "lmcache_l1_pool_abc"
    assert shm_segment_name("lmcache_l1_pool_abc") == "lmcache_l1_pool_abc"
    for bad in ("", "/", "a/b"):
        with pytest.raises(ValueError):
            shm_segment_name(bad)


def test_shm_arena_is_visible_by_name_and_unlinked_on_close() -> None:
    name = f"kvhive-test-{os.getpid()}"
    path = f"/dev/shm/lmcache_l1_pool_{name}"
    with open(path, "wb") as stale:  # a leftover of a crashed server
        stale.write(b"x" * 100)
    a = Arena(MiB, align=4096, shm_name="/" + name)
    try:
        assert a.shm_segment_name == f"lmcache_l1_pool_{name}"
        assert os.path.getsize(path) == MiB  # the stale segment was replaced
        a.array[4096:4100] = [1, 2, 3, 4]
        fd = os.open(path, os.O_RDWR)
        try:
            other = mmap.mmap(fd, MiB)
        finally:
            os.close(fd)
        assert other[4096:4100] == bytes([1, 2, 3, 4])
        other[0] = 9  # and the other way round
        assert a.array[0] == 9
        other.close()
    finally:
        a.close()
    assert not os.path.exists(path)


def test_shm_arena_cannot_be_lazy() -> None:
    with pytest.raises(ValueError):
        Arena(MiB, align=4096, lazy=True, shm_name="nope")


def test_anonymous_arena_asks_for_huge_pages() -> None:
    """The L1 side of a 32 MiB copy is 8,192 page translations with 4 KiB pages: the
    anonymous arena is advised MADV_HUGEPAGE (used where transparent huge pages are on)."""
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(thp) or "[never]" in Path(thp).read_text():
        pytest.skip("transparent huge pages are off here")
    with Arena(64 * MiB, align=2 * MiB) as a:
        assert a.wait_prefault(timeout=30)
        start = a.base_address
        huge = 0
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= start < hi
                elif inside and line.startswith("AnonHugePages:"):
                    huge = int(line.split()[1]) * 1024
        assert huge >= 2 * MiB  # at least one huge page (fewer if memory is fragmented)


def _resident_bytes(a: Arena, start: int, end: int) -> int:
    """Bytes of ``a.array[start:end]`` in memory (mincore), page granular."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    base = a.base_address + start - (a.base_address + start) % page
    n = -(-(a.base_address + end - base) // page)
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(n * page), vec) == 0
    return sum(v & 1 for v in vec) * page


def test_lazy_arena_is_populated_only_ahead_of_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy arena with a big initial heap (the seed's --l1-init-size-gb 20) must not take
    all of it at start: population runs POPULATE_AHEAD_BYTES ahead of what was handed out."""
    if not arena_mod.populate_supported():
        pytest.skip("the kernel lacks MADV_POPULATE_WRITE")
    monkeypatch.setattr(arena_mod, "POPULATE_AHEAD_BYTES", 8 * MiB)
    with Arena(256 * MiB, align=4096, lazy=True, init_bytes=128 * MiB) as a:
        assert a.heap_bytes == 128 * MiB
        assert a.wait_prefault(timeout=30)
        assert 8 * MiB <= _resident_bytes(a, 0, 128 * MiB) <= 10 * MiB
        a.note_used(3 * MiB)  # still 5 MiB ahead: nothing more
        assert a.wait_prefault(timeout=30)
        assert _resident_bytes(a, 8 * MiB, 128 * MiB) <= 2 * MiB
        a.note_used(40 * MiB)
        assert a.wait_prefault(timeout=30)
        assert _resident_bytes(a, 0, 48 * MiB) >= 46 * MiB  # up to 40 + 8 MiB
        assert _resident_bytes(a, 50 * MiB, 128 * MiB) <= 2 * MiB
        a.note_used(127 * MiB)  # never beyond the heap
        assert a.wait_prefault(timeout=30)
        assert _resident_bytes(a, 128 * MiB, 256 * MiB) <= 2 * MiB


def test_a_lazy_arena_larger_than_ram_and_swap_maps() -> None:
    """The seed's example asks for --l1-size-gb 100 --l1-use-lazy; without MAP_NORESERVE the
    overcommit heuristic refuses such a mapping on a smaller machine (ENOMEM at start)."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    size = 4 * (info["MemTotal"] + info.get("SwapTotal", 0))
    with Arena(size, align=4096, lazy=True, init_bytes=1) as a:
        a.array[a.heap_bytes - 1] = 1
        assert a.size_bytes == size


def test_populate_status_counts_down_to_a_populated_arena() -> None:
    if not arena_mod.populate_supported():
        pytest.skip("the kernel lacks MADV_POPULATE_WRITE")
    with Arena(64 * MiB, align=4096) as a:  # eager: the whole heap is queued at start
        first = a.populate_status()
        assert 0 <= first["pending_bytes"] <= 64 * MiB
        assert first["pending_bytes"] + first["populated_bytes"] <= 64 * MiB + 4096
        assert a.wait_prefault(timeout=30)
        done = a.populate_status()
        assert done["pending_bytes"] == 0 and done["failures"] == 0
        assert done["populated_bytes"] >= 64 * MiB - 4096


def test_lazy_population_looks_further_ahead_when_writes_catch_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writes that reach the populate front while population still runs (a burst, or a
    host slow to back fresh memory) double the window, up to the heap; writes that find
    population idle leave it as it is."""
    if not arena_mod.populate_supported():
        pytest.skip("the kernel lacks MADV_POPULATE_WRITE")
    monkeypatch.setattr(arena_mod, "POPULATE_AHEAD_BYTES", 8 * MiB)
    with Arena(256 * MiB, align=4096, lazy=True, init_bytes=64 * MiB) as a:
        assert a.wait_prefault(timeout=30)
        a.note_used(5 * MiB)  # caught up, population idle: same window
        assert a.populate_status()["ahead_bytes"] == 8 * MiB
        assert a.wait_prefault(timeout=30)
        prefaulter = a._prefaulter
        assert prefaulter is not None
        # a population still running (held busy by this stand-in: the real one is too fast
        # here to be caught mid-way)
        monkeypatch.setattr(prefaulter, "pending_bytes", lambda: 4 * MiB)
        a.note_used(10 * MiB)
        assert a.populate_status()["ahead_bytes"] == 16 * MiB
        a.note_used(20 * MiB)
        assert a.populate_status()["ahead_bytes"] == 32 * MiB
        for end in (40, 50, 60, 63):
            a.note_used(end * MiB)
        assert a.populate_status()["ahead_bytes"] == 64 * MiB  # never past the heap
        monkeypatch.undo()
        assert a.wait_prefault(timeout=30)
        assert _resident_bytes(a, 0, 64 * MiB) >= 62 * MiB
        assert _resident_bytes(a, 66 * MiB, 256 * MiB) <= 2 * MiB
