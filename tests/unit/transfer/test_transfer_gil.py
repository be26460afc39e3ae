"""Copies run without the GIL: other Python threads keep running meanwhile.

All layers live in one segment, so a gather is a single np.take over the
whole 32 MiB object (and a scatter two assignments): if numpy held the GIL
for such a call, a spinning Python thread would be stalled for its whole
duration and keep well under 60% of its solo speed (20% next to a 32 MiB
``bytes()`` copy, which holds the GIL); with the GIL released it keeps ~95%
on 2 cores (``np.copyto`` alike).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from support.shm import ShmSegment

NL, NB, BS, NH, HS, C = 16, 8, 128, 8, 128, 512


def spinner_share(op: Callable[[], None], seconds: float = 0.3) -> float:
    def run(work: Callable[[], None]) -> int:
        stop, count = threading.Event(), [0]

        def spin() -> None:
            n = 0
            while not stop.is_set():
                n += 1
            count[0] = n

        th = threading.Thread(target=spin)
        th.start()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            work()
        stop.set()
        th.join()
        return count[0]

    return run(op) / run(lambda: time.sleep(0.001))


def best_of(op: Callable[[], None], tries: int = 3) -> float:
    """Best share over a few tries: a busy CI box only ever lowers it."""
    best = 0.0
    for _ in range(tries):
        best = max(best, spinner_share(op))
        if best > 0.6:
            break
    return best


def test_gather_and_scatter_release_the_gil(shm_segment: Callable[[int], ShmSegment]) -> None:
    per = 2 * NB * BS * NH * HS
    seg = shm_segment(NL * per * 2)
    shape = (2, NB, BS, NH, HS)
    st = (NB * BS * NH * HS, BS * NH * HS, NH * HS, HS, 1)
    descs = [
        TensorDesc("bfloat16", shape, st, li * per, seg.name, NL * per * 2) for li in range(NL)
    ]
    with PagedKV.from_descriptors(descs, {"kv_layout": "NHD"}, [], C) as kv:
        assert len(kv._gather_plans) == 1 and kv.object_nbytes == 32 << 20
        out = np.empty(kv.object_nbytes, np.uint8)
        ids = [3, 1, 7, 0]
        gather = best_of(lambda: kv.gather(ids, out))
        scatter = best_of(lambda: kv.scatter(out, ids))
    assert gather > 0.6, f"Python thread kept only {gather:.0%} of its speed during gathers"
    assert scatter > 0.6, f"Python thread kept only {scatter:.0%} of its speed during scatters"
