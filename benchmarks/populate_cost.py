"""What populating an engine's KV segments costs at registration (issue 12).

    .venv/bin/python benchmarks/populate_cost.py [GiB ...]      # default: 2 8

For each size: 32 shared-memory segments (one per layer, as the lmcache 0.5.6 client makes
them), every page written by their creator first (a running engine's cache is); then
kvhive's ``SegmentTable`` maps them as a registration does and populates them in the
background.  Prints the time the mapping itself takes (what the registration reply waits
for), the time until every page is populated (the background work) with
``MADV_POPULATE_WRITE`` and with the read-touch fallback, and the faults a thread then
takes writing one byte per page (~0 once populated).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import resource
import sys
import time
from _posixshmem import shm_open, shm_unlink

import numpy as np

from kvhive.transfer import safecopy, shm
from kvhive.transfer.populate import PAGE, populate_supported
from kvhive.transfer.shm import SegmentTable

LAYERS = 32


def faults_writing(arrays: list[np.ndarray]) -> int:
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for a in arrays:
        offs = np.arange(0, a.size, PAGE, dtype=np.int64)
        safecopy.copy_rows(a, offs, np.ones(offs.size, np.uint8), None, 1, segment="bench")
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def measure(gib: float, how: str) -> None:
    per = int(gib * 2**30) // LAYERS // PAGE * PAGE
    names = [f"kvhive_popcost_{os.getpid()}_{i}" for i in range(LAYERS)]
    try:
        for name in names:
            fd = shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            try:
                os.ftruncate(fd, per)
                with mmap.mmap(fd, per) as m:
                    np.frombuffer(m, np.uint8).fill(1)  # the engine wrote its cache
            finally:
                os.close(fd)
        if how == "read-touch":
            shm.populate_supported = lambda: False  # type: ignore[assignment]
        table = SegmentTable()
        t0 = time.perf_counter()
        maps = [table.acquire(n, per) for n in names]
        t_map = time.perf_counter() - t0
        table.wait_populated()
        t_pop = time.perf_counter() - t0
        faults = faults_writing([m.array for m in maps])
        stats = table.populate_stats()
        table.close()
        print(  # noqa: T201 - a benchmark script reports on stdout
            f"{gib:5.1f} GiB {how:14s}: mapping {t_map * 1e3:7.1f} ms (registration), "
              f"populated after {t_pop:6.3f} s ({t_pop / gib:.3f} s/GiB, "
              f"{stats.bytes_done / 2**30:.2f} GiB), then {faults} faults writing "
              f"{LAYERS * per // PAGE} pages")  # fmt: skip
    finally:
        shm.populate_supported = populate_supported  # type: ignore[assignment]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                shm_unlink("/" + name)


def main() -> None:
    sizes = [float(x) for x in sys.argv[1:]] or [2.0, 8.0]
    print(f"MADV_POPULATE supported: {populate_supported()}")  # noqa: T201
    for gib in sizes:
        for how in ("madvise", "read-touch"):
            measure(gib, how)


if __name__ == "__main__":
    main()
