"""The core of the ``l2`` bench section: buffers, movers and the interleaved timing loop.

A *mover* writes object ``i`` from a source buffer and reads it back into a destination
buffer, timing each call (:class:`Mover`).  :class:`AdapterMover` drives an L2 adapter through
its :class:`~kvhive.storage.l2.base.L2Adapter` contract; the floors (``l2_floors``) are movers
too (``dd``, memcpy, raw service clients), so :func:`measure_pair` times an adapter and its
floor in the same loop, one repetition of each in turn: on a busy machine both see the same
noise.  Used in-process by ``l2_section`` and, for Mooncake, inside a private network namespace
by ``l2_mooncake.py`` (results cross the process boundary as JSON).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from kvhive.config.l2_adapters import parse_adapter
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import HostRegion, L2Adapter
from kvhive.storage.l2.registry import build_adapter

PAGE = 4096
MODEL = "kvhive-bench-l2"
OP_TIMEOUT_S = 120.0


def warm_memory(nbytes: int) -> float:
    """Touch and release ``nbytes`` of anonymous memory; returns the seconds it took.

    On a virtual machine the first touch of guest memory the guest never used is slow (here
    about 450 ms per 32 MiB, against 13 ms once the pages were used and freed): a tier that
    allocates per object (mock) or grows the page cache (file tiers) would time that instead
    of itself.  The kernel hands recently freed pages out first, so touching some memory
    before timing makes the run measure what a long-running server sees."""
    t0 = time.perf_counter()
    if nbytes > 0:
        with mmap.mmap(-1, nbytes) as m:
            np.frombuffer(m, np.uint8)[::PAGE] = 1
    return time.perf_counter() - t0


class Arena:
    """One page-aligned anonymous mapping (transparent huge pages advised, as the server's
    L1) cut into ``slots`` buffers of ``nbytes``; slots ``0..sources-1`` hold random bytes
    (the objects written), the rest are destinations.  Every page is touched at creation,
    so no timed copy faults.  :meth:`host_region` is the arena as an L1 the adapter may
    register once (NIXL)."""

    def __init__(self, nbytes: int, sources: int = 2, dests: int = 2) -> None:
        if nbytes <= 0 or nbytes % PAGE:
            raise ValueError(f"object size must be a positive multiple of {PAGE} (got {nbytes})")
        self.nbytes = nbytes
        self.sources, self.dests = sources, dests
        self._map = mmap.mmap(-1, nbytes * (sources + dests))
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.array = np.frombuffer(self._map, np.uint8)
        rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
        for i in range(sources):
            self.src(i)[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
        self.array[sources * nbytes :] = 0
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def _slot(self, i: int) -> np.ndarray:
        return self.array[i * self.nbytes : (i + 1) * self.nbytes]

    def src(self, i: int) -> np.ndarray:
        """Source buffer of object ``i`` (the slots rotate: ``i % sources``)."""
        return self._slot(i % self.sources)

    def dst(self, i: int) -> np.ndarray:
        """Destination buffer of object ``i`` (``i % dests`` after the sources)."""
        return self._slot(self.sources + i % self.dests)

    def host_region(self) -> HostRegion:
        return HostRegion(self.base, len(self._map), PAGE)

    def close(self) -> None:
        """Release the mapping (every view must be gone: numpy arrays are dropped here)."""
        del self.array
        self.base = 0
        with contextlib.suppress(BufferError):  # a view is still held: it goes with that
            self._map.close()


class Mover(Protocol):
    """Writes and reads objects of :attr:`Arena.nbytes` bytes; each call returns seconds.

    ``write(i)`` stores object ``i`` from ``arena.src(i)``; ``read(i)`` loads it into
    ``arena.dst(i)`` right after (page cache, or whatever the tier reads from);
    ``read_cold(i)`` drops this mover's own cached copy of object ``i`` first (untimed) and
    returns None when the tier has no such distinction.  A failed call raises."""

    def write(self, i: int) -> float: ...
    def read(self, i: int) -> float: ...
    def read_cold(self, i: int) -> float | None: ...
    def close(self) -> None: ...


def bench_key(i: int) -> ObjectKey:
    """A key nobody used before (fresh per repetition and per run)."""
    return ObjectKey(os.urandom(24) + i.to_bytes(8, "big"), MODEL, 0)


class AdapterMover:
    """An L2 adapter built from its JSON (``parse_adapter`` + ``build_adapter``, with the
    arena as ``host``) and driven one 32 MiB object per call; each call is timed from
    ``submit_*`` to its future's result.  ``cold`` (optional) drops the tier's own cached
    pages (``l2_floors.drop_cache``) before a cold read."""

    def __init__(
        self, raw: dict[str, Any], arena: Arena, cold: Callable[[], None] | None = None
    ) -> None:
        self.arena = arena
        self.adapter: L2Adapter = build_adapter(parse_adapter(0, raw), arena.host_region())
        self._cold = cold
        self._keys: dict[int, ObjectKey] = {}

    def _view(self, a: np.ndarray) -> memoryview:
        return a.data.cast("B")

    def write(self, i: int) -> float:
        key = self._keys[i] = bench_key(i)
        view = self._view(self.arena.src(i)).toreadonly()
        t0 = time.perf_counter()
        ok = self.adapter.submit_store([key], [view]).result(OP_TIMEOUT_S)
        dt = time.perf_counter() - t0
        if not all(ok):
            raise RuntimeError(f"store of object {i} failed: {list(ok)}")
        return dt

    def read(self, i: int) -> float:
        view = self._view(self.arena.dst(i))
        t0 = time.perf_counter()
        ok = self.adapter.submit_load([self._keys[i]], [view]).result(OP_TIMEOUT_S)
        dt = time.perf_counter() - t0
        if not all(ok):
            raise RuntimeError(f"load of object {i} failed: {list(ok)}")
        return dt

    def read_cold(self, i: int) -> float | None:
        if self._cold is None:
            return None
        self._cold()
        return self.read(i)

    def verify(self, i: int) -> bool:
        """Load object ``i`` into a zeroed buffer and compare it with what was written."""
        self.arena.dst(i)[:] = 0
        self.read(i)
        return bool(np.array_equal(self.arena.dst(i), self.arena.src(i)))

    def close(self) -> None:
        self.adapter.close()


@dataclass(frozen=True, slots=True)
class Figures:
    """Median GB/s (10^9 bytes/s) of one mover: ``write``, ``read`` right after the write,
    ``read_cold`` after dropping the mover's own cached pages (None: not measured)."""

    write_gbs: float
    read_gbs: float
    read_cold_gbs: float | None = None


@dataclass(frozen=True, slots=True)
class PairResult:
    """An adapter and its floor timed in one interleaved loop of ``reps`` repetitions;
    ``verified``: the adapter's loaded bytes equalled the written ones."""

    tier: Figures
    floor: Figures
    reps: int
    verified: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairResult:
        return cls(Figures(**d["tier"]), Figures(**d["floor"]), int(d["reps"]),
                   bool(d["verified"]))  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Samples:
    """Seconds per call of one mover, per operation."""

    write: list[float]
    read: list[float]
    cold: list[float]

    def figures(self, nbytes: int) -> Figures:
        def gbs(ts: list[float]) -> float:
            return round(nbytes / statistics.median(ts) / 1e9, 3)

        return Figures(gbs(self.write), gbs(self.read), gbs(self.cold) if self.cold else None)


def measure_pair(
    tier: AdapterMover, floor: Mover, reps: int, *, cold: bool = True, warmup: int = 1
) -> PairResult:
    """Time ``reps`` writes and reads of the adapter and of its floor, alternating (adapter
    write, floor write, adapter read, floor read per repetition), after ``warmup`` untimed
    repetitions of each; then, with ``cold``, a cold read of every object of each.  Medians;
    the adapter's last object is verified byte for byte."""
    ts, fs = _Samples([], [], []), _Samples([], [], [])
    for i in range(warmup + reps):
        tw, fw = tier.write(i), floor.write(i)
        tr, fr = tier.read(i), floor.read(i)
        if i >= warmup:
            ts.write.append(tw)
            fs.write.append(fw)
            ts.read.append(tr)
            fs.read.append(fr)
    if cold:
        for i in range(warmup, warmup + reps):
            tc, fc = tier.read_cold(i), floor.read_cold(i)
            if tc is not None and fc is not None:
                ts.cold.append(tc)
                fs.cold.append(fc)
    verified = tier.verify(warmup + reps - 1)
    n = tier.arena.nbytes
    return PairResult(ts.figures(n), fs.figures(n), reps, verified)
