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

Each next to the floor the bench uses: one-thread ``np.copyto`` of 32 MiB.  One chunk of an
8B-Llama-like model (32 layers x 8 heads x 128 dims, bf16, 256 tokens = 32 MiB), each layer
in its own segment, in two layouts: NHD ``[2, NB, BS, NH, HS]`` (a block is contiguous on
both sides) and HND ``[2, NB, NH, BS, HS]`` (what ``kvhive bench`` registers: 256-byte
rows).  Median of several runs, random block ids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kvhive.transfer import paged
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from support.descriptors import contiguous_strides
from support.shm import ShmSegment

NL, NH, HS, C, BS = 32, 8, 128, 256, 16
MIB = 1 << 20
IOV_MAX = 1024


def median_s(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm up (page faults)
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


def plan(kv: PagedKV, ids: np.ndarray, runs: list[paged._Run]) -> list[tuple[int, int, np.ndarray]]:
    """(run index, object byte offset, segment byte offset of each row) per (run, kv plane)
    of a chunk, rows in object order."""
    nl = kv.layout.num_layers
    plane = kv.object_nbytes // (kv.layout.kv_size * nl)
    out = []
    for r_i, run in enumerate(runs):
        for k in range(kv.layout.kv_size):
            offs = run.static[k][:, None, :] + ids[None, :, None] * run.block_step[:, None, None]
            out.append((r_i, (k * nl + run.j0) * plane, offs.reshape(-1)))
    return out


def io_calls(
    kv: PagedKV, ids: np.ndarray, runs: list[paged._Run]
) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """preadv/pwritev calls of a chunk: (segment name, file offset, [(object offset, length),
    ...]) -- one call per contiguous file range (rows sorted by file offset; at most IOV_MAX
    pieces), object pieces merged where they are contiguous too."""
    out = []
    for r_i, obj0, offs in plan(kv, ids, runs):
        run = runs[r_i]
        rb = run.row_bytes
        order = np.argsort(offs, kind="stable")
        f_sorted = offs[order]
        o_sorted = obj0 + order * rb
        brk = np.flatnonzero(np.diff(f_sorted) != rb) + 1
        starts = np.concatenate([[0], brk]).tolist()
        ends = np.concatenate([brk, [offs.size]]).tolist()
        for a, b in zip(starts, ends, strict=True):
            for c0 in range(a, b, IOV_MAX):
                c1 = min(b, c0 + IOV_MAX)
                pieces = [(int(o), rb) for o in o_sorted[c0:c1]]
                out.append((run.name, int(f_sorted[c0]), _merge(pieces)))
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


def measure_layout(layout: str, runs_n: int, row: Row) -> None:
    nb = 2 * C // BS
    segs, kv = build(layout, nb)
    try:
        assert kv.object_nbytes == 32 * MIB
        ids_l = [int(x) for x in np.random.default_rng(3).permutation(nb)[: kv.blocks_per_chunk]]
        ids = np.asarray(ids_l, np.int64)
        out = np.empty(kv.object_nbytes, np.uint8)

        def gather() -> None:
            kv.gather(ids_l, out)

        def scatter() -> None:
            kv.scatter(out, ids_l)

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
            omv = memoryview(out)
            g_calls = [
                (fds[n], off, [omv[o : o + ln] for o, ln in pieces])
                for n, off, pieces in io_calls(kv, ids, kv._gather_runs)
            ]
            s_calls = [
                (fds[n], off, [omv[o : o + ln] for o, ln in pieces])
                for n, off, pieces in io_calls(kv, ids, kv._scatter_runs)
            ]

            def pread_all() -> None:
                for f, off, bufs in g_calls:
                    os.preadv(f, bufs, off)

            def pwrite_all() -> None:
                for f, off, bufs in s_calls:
                    os.pwritev(f, bufs, off)

            n_iov = sum(len(b) for _, _, b in g_calls)
            print(f"     ({len(g_calls)} preadv calls, {n_iov} iovecs per chunk)")
            row(layout, "preadv (1 thread)", "gather", median_s(pread_all, runs_n))
            row(layout, "pwritev (1 thread)", "scatter", median_s(pwrite_all, runs_n))
        finally:
            for f in fds.values():
                os.close(f)

        # the old, unsafe numpy copies (np.take / fancy assignment on the mapping)
        def np_gather() -> None:
            for r_i, obj0, offs in plan(kv, ids, kv._gather_runs):
                run = kv._gather_runs[r_i]
                rb = run.row_bytes
                rows_v = run.seg[: run.seg.size // rb * rb].reshape(-1, rb)
                part = out[obj0 : obj0 + offs.size * rb].reshape(-1, rb)
                np.take(rows_v, offs // rb, axis=0, out=part, mode="clip")

        def np_scatter() -> None:
            for r_i, obj0, offs in plan(kv, ids, kv._scatter_runs):
                run = kv._scatter_runs[r_i]
                rb = run.row_bytes
                rows_v = run.seg[: run.seg.size // rb * rb].reshape(-1, rb)
                rows_v[offs // rb] = out[obj0 : obj0 + offs.size * rb].reshape(-1, rb)

        row(layout, "numpy, unsafe (1 thread)", "gather", median_s(np_gather, runs_n))
        row(layout, "numpy, unsafe (1 thread)", "scatter", median_s(np_scatter, runs_n))
    finally:
        kv.close()
        for s in segs:
            s.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    runs_n = 5 if args.quick else 11

    src = np.random.default_rng(1).integers(0, 256, 32 * MIB, dtype=np.uint8)
    dst = np.empty_like(src)
    t_mem = median_s(lambda: np.copyto(dst, src), runs_n)
    memcpy = 32 * MIB / t_mem / 1e9
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

    print(f"memcpy floor (np.copyto 32 MiB, one thread): {memcpy:.2f} GB/s")
    # The bound of the fd approach: one pread/pwrite of 32 MiB of a segment.
    big = ShmSegment(32 * MIB, prefix="kvhive_scb_").fill_random(np.random.default_rng(2))
    fd = os.open(f"/dev/shm/{big.name}", os.O_RDWR)
    try:
        mv = memoryview(dst)
        t_read = median_s(lambda: os.preadv(fd, [mv], 0), runs_n)
        t_write = median_s(lambda: os.pwritev(fd, [mv], 0), runs_n)
        row("-", "pread, one 32 MiB call (bound)", "gather", t_read)
        row("-", "pwrite, one 32 MiB call (bound)", "scatter", t_write)
    finally:
        os.close(fd)
        big.destroy()
    for layout in ("NHD", "HND"):
        measure_layout(layout, runs_n, row)
    if args.json:
        args.json.write_text(json.dumps({"memcpy_GBps": round(memcpy, 2), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
