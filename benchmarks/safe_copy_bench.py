"""SIGBUS-safe copies between engine segments and L1: the candidates, measured (issue 10, fault 1).

    .venv/bin/python benchmarks/safe_copy_bench.py [--quick] [--json out.json]

A worker may truncate its ``cpu_shm`` segment after registering it; a copy that then touches
a page past the new end raises SIGBUS.  Candidates for a copy that survives that:

* ``safe memcpy`` -- what kvhive ships: numpy computes one byte offset per row, the native
  helper ``kvhive.transfer._safecopy`` memcpy's the rows under a per-thread
  sigsetjmp/siglongjmp recovery point, without the GIL (``PagedKV.gather``/``scatter``,
  two copy threads for a 32 MiB chunk; also shown on one thread).
* ``preadv/pwritev`` -- copy through the segment's file descriptor: a short segment is a
  short read, never a signal.  One system call per contiguous segment range; a range whose
  object rows are not contiguous (HND layouts: one head row of 256 bytes) becomes an iovec
  per row.  Driven from Python (``os.preadv``/``os.pwritev`` release the GIL), one thread;
  and the bound of the approach: a single 32 MiB ``pread``/``pwrite`` (no plan at all).
* ``numpy (unsafe)`` -- the copy kvhive had before: ``np.take`` / fancy assignment straight
  on the mapping (a SIGBUS there kills the process).

Each next to the floor ``kvhive bench`` uses: one-thread ``np.copyto`` of 32 MiB chunks,
cache-cold.  One chunk of an
8B-Llama-like model (32 layers x 8 heads x 128 dims, bf16, 256 tokens = 32 MiB), each layer
in its own segment, in two layouts: NHD ``[2, NB, BS, NH, HS]`` (a block is contiguous on
both sides) and HND ``[2, NB, NH, BS, HS]`` (what ``kvhive bench`` registers: 256-byte
rows).  Median of 24 copies, each of another of 6 chunks (random block ids, its own object
buffer), so that no copy is served from the cache.

Recorded 2026-12-04 (2-core AMD EPYC dev box, other work running; medians of 3 runs; floor
19.1 GB/s), GB/s and x memcpy, gather / scatter:

    candidate                          NHD                        HND
    safe memcpy, kvhive (2 threads)    13.9 0.73x / 21.4 1.12x    15.9 0.83x / 17.5 0.92x
    safe memcpy, 1 thread              12.0 0.63x / 19.1 1.00x    11.2 0.59x / 12.0 0.63x
    preadv / pwritev, 1 thread          5.5 0.29x /  5.8 0.30x     2.8 0.14x /  2.9 0.15x
      bound: one 32 MiB pread / pwrite  7.1 0.37x /  6.9 0.36x
    numpy (the old, unsafe copy)       10.0 0.52x / 14.9 0.78x    10.8 0.56x /  9.9 0.52x

The fd path is bounded by the kernel's page-cache copy (one 32 MiB call: 0.37x) before any
per-call cost, so it cannot reach 0.7x; the safe memcpy is faster than the copy it replaces.
``kvhive bench --sections memcpy,transfer --shapes 32L-8H-128D --modes lmcache_driven
--chunks 16 --rounds 3``, the commit before against this one, 3 runs each (median x memcpy,
lmcache client then kvhive client): store 1/16 chunks per request 0.54/0.73 -> 0.69/0.79
and 0.59/0.75 -> 0.69/0.91; retrieve 0.48/0.54 -> 0.70/0.75 and 0.60/0.69 -> 0.80/0.97.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kvhive.bench.runner import measure_memcpy
from kvhive.transfer import paged
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from support.descriptors import contiguous_strides
from support.shm import ShmSegment

NL, NH, HS, C, BS = 32, 8, 128, 256, 16
MIB = 1 << 20
IOV_MAX = 1024
CHUNKS = 6  # chunks (each with its own blocks and object buffer) the timed copies cycle over


def median_s(fn: Callable[[], object], runs: int) -> float:
    for _ in range(CHUNKS):  # warm up: fault in every page once
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(layout: str, nb: int) -> tuple[list[ShmSegment], PagedKV]:
    phys = (2, nb, BS, NH, HS) if layout == "NHD" else (2, nb, NH, BS, HS)
    n = int(np.prod(phys)) * 2
    segs, descs = [], []
    rng = np.random.default_rng(0)
    for _ in range(NL):
        s = ShmSegment(n, prefix="kvhive_scb_").fill_random(rng)
        segs.append(s)
        descs.append(TensorDesc("bfloat16", phys, contiguous_strides(phys), 0, s.name, n))
    return segs, PagedKV.from_descriptors(descs, {"kv_layout": layout}, [], C)


@dataclass(frozen=True)
class PlaneRows:
    """One object plane of a chunk: its segment, row size, object offset and the segment
    byte offset of each row, in object order (from the registration's block plan)."""

    seg: np.ndarray
    name: str
    row_bytes: int
    obj0: int
    offs: np.ndarray


def plan(kv: PagedKV, ids: np.ndarray, to_engine: bool) -> list[PlaneRows]:
    """Per object plane of a chunk, the rows the native copy moves (``paged._BlockPlan``)."""
    out = []
    for bp in kv._scatter_plans if to_engine else kv._gather_plans:
        st = bp.statics.reshape(bp.planes, bp.rows)
        for p in range(bp.planes):
            offs = (st[p][None, :] + ids[:, None] * bp.plane_step[p]).reshape(-1)
            i = int(bp.plane_seg[p])
            out.append(PlaneRows(bp.segs[i], bp.names[i], bp.row_bytes, int(bp.plane_obj[p]), offs))
    return out


def io_calls(
    kv: PagedKV, ids: np.ndarray, to_engine: bool
) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """preadv/pwritev calls of a chunk: (segment name, file offset, [(object offset, length),
    ...]) -- one call per contiguous file range (rows sorted by file offset; at most IOV_MAX
    pieces), object pieces merged where they are contiguous too."""
    out = []
    for pr in plan(kv, ids, to_engine):
        rb, offs = pr.row_bytes, pr.offs
        order = np.argsort(offs, kind="stable")
        f_sorted = offs[order]
        o_sorted = pr.obj0 + order * rb
        brk = np.flatnonzero(np.diff(f_sorted) != rb) + 1
        starts = np.concatenate([[0], brk]).tolist()
        ends = np.concatenate([brk, [offs.size]]).tolist()
        for a, b in zip(starts, ends, strict=True):
            for c0 in range(a, b, IOV_MAX):
                c1 = min(b, c0 + IOV_MAX)
                pieces = [(int(o), rb) for o in o_sorted[c0:c1]]
                out.append((pr.name, int(f_sorted[c0]), _merge(pieces)))
    return out


def _merge(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for off, ln in pieces:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + ln)
        else:
            merged.append((off, ln))
    return merged


Row = Callable[[str, str, str, float], None]


def cycling(fns: list[Callable[[], object]]) -> Callable[[], None]:
    """One call runs the next of ``fns``: consecutive timed copies touch other memory."""
    it = itertools.cycle(fns)

    def step() -> None:
        next(it)()

    return step


def measure_layout(layout: str, runs_n: int, row: Row) -> None:
    """Each timed copy moves another of CHUNKS chunks (its own blocks, its own object
    buffer), so no copy finds the previous one's bytes in the cache (as with the floor)."""
    nb = CHUNKS * C // BS
    segs, kv = build(layout, nb)
    try:
        assert kv.object_nbytes == 32 * MIB
        perm = np.random.default_rng(3).permutation(nb)
        bpc = kv.blocks_per_chunk
        chunk_ids = [[int(x) for x in perm[i * bpc : (i + 1) * bpc]] for i in range(CHUNKS)]
        outs = [np.empty(kv.object_nbytes, np.uint8) for _ in range(CHUNKS)]
        pairs = list(zip(chunk_ids, outs, strict=True))

        gather = cycling([functools.partial(kv.gather, i, o) for i, o in pairs])
        scatter = cycling([functools.partial(kv.scatter, o, i) for i, o in pairs])
        row(layout, "safe memcpy (kvhive, 2 threads)", "gather", median_s(gather, runs_n))
        row(layout, "safe memcpy (kvhive, 2 threads)", "scatter", median_s(scatter, runs_n))
        saved = paged.COPY_THREADS
        paged.COPY_THREADS = 1
        try:
            row(layout, "safe memcpy (1 thread)", "gather", median_s(gather, runs_n))
            row(layout, "safe memcpy (1 thread)", "scatter", median_s(scatter, runs_n))
        finally:
            paged.COPY_THREADS = saved

        # preadv / pwritev through each segment's descriptor, following the same plan
        fds = {n: os.open(f"/dev/shm/{n}", os.O_RDWR) for n in {s.name for s in segs}}
        try:
            g_all, s_all = [], []
            for ids_l, out in pairs:
                ids, omv = np.asarray(ids_l, np.int64), memoryview(out)
                g_all.append(
                    [
                        (fds[n], off, [omv[o : o + ln] for o, ln in pieces])
                        for n, off, pieces in io_calls(kv, ids, False)
                    ]
                )
                s_all.append(
                    [
                        (fds[n], off, [omv[o : o + ln] for o, ln in pieces])
                        for n, off, pieces in io_calls(kv, ids, True)
                    ]
                )

            def pread_all(calls: list[tuple[int, int, list[memoryview]]]) -> None:
                for f, off, bufs in calls:
                    os.preadv(f, bufs, off)

            def pwrite_all(calls: list[tuple[int, int, list[memoryview]]]) -> None:
                for f, off, bufs in calls:
                    os.pwritev(f, bufs, off)

            n_iov = sum(len(b) for _, _, b in g_all[0])
            print(f"     ({len(g_all[0])} preadv calls, {n_iov} iovecs per chunk)")
            pread = cycling([functools.partial(pread_all, c) for c in g_all])
            pwrite = cycling([functools.partial(pwrite_all, c) for c in s_all])
            row(layout, "preadv (1 thread)", "gather", median_s(pread, runs_n))
            row(layout, "pwritev (1 thread)", "scatter", median_s(pwrite, runs_n))
        finally:
            for f in fds.values():
                os.close(f)

        # the old, unsafe numpy copies (np.take / fancy assignment on the mapping)
        def np_gather(ids: np.ndarray, out: np.ndarray) -> None:
            for pr in plan(kv, ids, False):
                rb, offs = pr.row_bytes, pr.offs
                rows_v = pr.seg[: pr.seg.size // rb * rb].reshape(-1, rb)
                part = out[pr.obj0 : pr.obj0 + offs.size * rb].reshape(-1, rb)
                np.take(rows_v, offs // rb, axis=0, out=part, mode="clip")

        def np_scatter(ids: np.ndarray, out: np.ndarray) -> None:
            for pr in plan(kv, ids, True):
                rb, offs = pr.row_bytes, pr.offs
                rows_v = pr.seg[: pr.seg.size // rb * rb].reshape(-1, rb)
                rows_v[offs // rb] = out[pr.obj0 : pr.obj0 + offs.size * rb].reshape(-1, rb)

        np_pairs = [(np.asarray(i, np.int64), o) for i, o in pairs]
        npg = cycling([functools.partial(np_gather, i, o) for i, o in np_pairs])
        nps = cycling([functools.partial(np_scatter, i, o) for i, o in np_pairs])
        row(layout, "numpy, unsafe (1 thread)", "gather", median_s(npg, runs_n))
        row(layout, "numpy, unsafe (1 thread)", "scatter", median_s(nps, runs_n))
    finally:
        kv.close()
        for s in segs:
            s.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument(
        "--gather-row-cap",
        type=int,
        default=paged.GATHER_ROW_CAP,
        help="bytes per gather row at most (kvhive: %(default)s = uncut)",
    )
    args = ap.parse_args()
    paged.GATHER_ROW_CAP = args.gather_row_cap
    runs_n = 6 if args.quick else 24

    memcpy = measure_memcpy()  # the floor `kvhive bench` reports against
    rows: list[dict[str, object]] = []

    def row(layout: str, what: str, direction: str, seconds: float) -> None:
        gbs = 32 * MIB / seconds / 1e9
        rows.append(
            {
                "layout": layout,
                "candidate": what,
                "direction": direction,
                "GB/s": round(gbs, 2),
                "x_memcpy": round(gbs / memcpy, 2),
            }
        )
        print(f"{layout:4s} {what:34s} {direction:8s} {gbs:6.2f} GB/s  {gbs / memcpy:5.2f}x memcpy")

    print(f"memcpy floor (kvhive bench's: np.copyto of 32 MiB, cache-cold): {memcpy:.2f} GB/s")
    # The bound of the fd approach: whole 32 MiB segments in one pread/pwrite each.
    bigs = [ShmSegment(32 * MIB, prefix="kvhive_scb_").fill_random(np.random.default_rng(2))]
    bigs += [ShmSegment(32 * MIB, prefix="kvhive_scb_") for _ in range(CHUNKS - 1)]
    fds = [os.open(f"/dev/shm/{b.name}", os.O_RDWR) for b in bigs]
    bufs = [memoryview(np.ones(32 * MIB, np.uint8)) for _ in range(CHUNKS)]
    try:
        for f in fds:
            os.pwritev(f, [bufs[0]], 0)  # allocate every page first
        pairs = list(zip(fds, bufs, strict=True))
        rd = cycling([functools.partial(os.preadv, f, [b], 0) for f, b in pairs])
        wr = cycling([functools.partial(os.pwritev, f, [b], 0) for f, b in pairs])
        row("-", "pread, one 32 MiB call (bound)", "gather", median_s(rd, runs_n))
        row("-", "pwrite, one 32 MiB call (bound)", "scatter", median_s(wr, runs_n))
    finally:
        for f in fds:
            os.close(f)
        for b in bigs:
            b.destroy()
    for layout in ("NHD", "HND"):
        measure_layout(layout, runs_n, row)
    if args.json:
        args.json.write_text(json.dumps({"memcpy_GBps": round(memcpy, 2), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
