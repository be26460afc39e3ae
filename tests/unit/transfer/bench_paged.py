"""Throughput, profile and GIL behaviour of PagedKV (a script, not a test).

    PYTHONPATH=tests .venv/bin/python tests/unit/transfer/bench_paged.py [--layouts] [--gil]
        [--geometries smollm2,8b,mla] [--threads N] [--parallel-min-mib M]

Geometries, as vLLM's CPU backend registers them (one shared-memory segment per
layer, bf16, block size 16, 256-token chunks):

    smollm2   30 layers, HND [2, NB, 3, 16, 64]     5.6 MiB/chunk, 128-byte head rows
    8b        32 layers, HND [2, NB, 8, 16, 128]   32 MiB/chunk, 256-byte head rows
    mla       27 layers, MLA [NB, 16, 576]          7.6 MiB/chunk, one 18 KiB block rows

Each request draws fresh random blocks from a cache of ``CACHE_CHUNKS`` chunks
(touched once first, so no page faults: the engine path after registration
populated the mapping), 1 or 16 chunks per request (16 = 16 gather/scatter
calls into 16 objects, as engine/transfers.py does).  Medians next to a
same-size single-thread ``np.copyto`` (the floor) and a breakdown of one
1-chunk copy: the native copy alone (``safecopy`` calls, timed by wrapping
them) against the whole call (numpy offsets + Python around it).

``--layouts`` adds the older table (32 MiB chunk, NHD/HND/fused, BS 16 and 128);
``--gil`` the GIL checks (a Python thread keeps running during copies; two
copying threads overlap).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvhive.transfer import paged, safecopy
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from support.descriptors import contiguous_strides
from support.shm import ShmSegment

C = 256
MIB = 1 << 20
CACHE_CHUNKS = 20


@dataclass(frozen=True)
class Geometry:
    name: str
    layers: int
    phys: Callable[[int], tuple[int, ...]]  # per-layer shape for NB blocks
    hint: str


GEOMETRIES = {
    "smollm2": Geometry("smollm2", 30, lambda nb: (2, nb, 3, 16, 64), "HND"),
    "8b": Geometry("8b", 32, lambda nb: (2, nb, 8, 16, 128), "HND"),
    "mla": Geometry("mla", 27, lambda nb: (nb, 16, 576), "HND"),
}


def engine(layers: int, phys: tuple[int, ...], hint: str) -> tuple[list[ShmSegment], PagedKV]:
    segs, descs = [], []
    rng = np.random.default_rng(0)
    for _ in range(layers):
        n = int(np.prod(phys)) * 2
        s = ShmSegment(n).fill_random(rng)
        segs.append(s)
        descs.append(TensorDesc("bfloat16", phys, contiguous_strides(phys), 0, s.name, n))
    return segs, PagedKV.from_descriptors(descs, {"kv_layout": hint}, [], C)


def median_s(fn: Callable[[], object], runs: int = 9) -> float:
    fn()  # warm up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def median_fresh(fn: Callable[[object], object], args: Callable[[], object], runs: int) -> float:
    """Median of ``fn(args())``, ``args()`` (fresh block ids) outside the timing."""
    fn(args())
    times = []
    for _ in range(runs):
        a = args()
        t = time.perf_counter()
        fn(a)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class NativeTimer:
    """Wraps the native copy entry points of safecopy to sum the time spent in them."""

    def __init__(self) -> None:
        self.total = 0.0
        self.calls = 0
        self._saved: dict[str, Callable[..., object]] = {}

    def __enter__(self) -> NativeTimer:
        for name in ("_native", "_native_blocks"):
            fn = getattr(safecopy, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def timed(*a: object, _fn: Callable[..., object] = fn) -> object:
                t = time.perf_counter()
                try:
                    return _fn(*a)
                finally:
                    self.total += time.perf_counter() - t
                    self.calls += 1

            setattr(safecopy, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(safecopy, name, fn)


def profile(
    fn: Callable[[object], object], args: Callable[[], object], runs: int = 15
) -> tuple[float, float, int]:
    """(median whole call, median time inside native copies, native calls per call);
    single-threaded (parallel copies would overlap the native timers)."""
    saved = paged.PARALLEL_MIN_BYTES
    paged.PARALLEL_MIN_BYTES = 1 << 62
    try:
        fn(args())
        whole, native, calls = [], [], 0
        for _ in range(runs):
            a = args()
            with NativeTimer() as nt:
                t = time.perf_counter()
                fn(a)
                whole.append(time.perf_counter() - t)
            native.append(nt.total)
            calls = nt.calls
        return statistics.median(whole), statistics.median(native), calls
    finally:
        paged.PARALLEL_MIN_BYTES = saved


def bench_geometry(g: Geometry, runs: int) -> None:
    bpc = C // 16
    nb = CACHE_CHUNKS * bpc
    segs, kv = engine(g.layers, g.phys(nb), g.hint)
    try:
        size = kv.object_nbytes
        rng = np.random.default_rng(2)
        objs = [np.empty(size, np.uint8) for _ in range(16)]
        # Touch every block of the cache once (a populated mapping, as after registration).
        for c in range(CACHE_CHUNKS):
            kv.gather(list(range(c * bpc, (c + 1) * bpc)), objs[0])
        for o in objs:
            o[:] = 1

        def fresh(n: int) -> list[list[int]]:
            ids = rng.permutation(nb)[: n * bpc]
            return [[int(x) for x in ids[i * bpc : (i + 1) * bpc]] for i in range(n)]

        # The floor: np.copyto of the same size, source and destination out of cache
        # (a different slice of a 16-chunk buffer each time, as fresh blocks are).
        a = np.random.default_rng(1).integers(0, 256, 16 * size, dtype=np.uint8)
        b = a.copy()  # every page touched
        turn = iter(range(1 << 30))

        def slices() -> tuple[np.ndarray, np.ndarray]:
            i = next(turn) % 16
            return b[i * size : (i + 1) * size], a[i * size : (i + 1) * size]

        t_mem1 = median_fresh(lambda ab: np.copyto(*ab), slices, runs)  # type: ignore[misc]
        t_mem16 = median_s(lambda: np.copyto(b, a), runs)
        print(
            f"{g.name}: {size / MIB:.2f} MiB/chunk; np.copyto {size / t_mem1 / 1e9:5.2f} GB/s "
            f"(1 chunk), {16 * size / t_mem16 / 1e9:5.2f} GB/s (16 chunks), out of cache"
        )
        for n, t_mem in ((1, t_mem1), (16, t_mem16)):
            for op in ("gather", "scatter"):

                def once(req: object, op: str = op) -> None:
                    k = next(turn)  # another object each request: none is still in cache
                    mine = objs[k % 16 :] + objs[: k % 16]
                    for obj, ids in zip(mine, req, strict=False):  # type: ignore[call-overload]
                        if op == "gather":
                            kv.gather(ids, obj)
                        else:
                            kv.scatter(obj, ids)

                t = median_fresh(once, lambda n=n: fresh(n), runs)
                gbs = n * size / t / 1e9
                print(
                    f"  {op:7s} {n:2d} chunk/req: {t * 1e3:7.3f} ms {gbs:6.2f} GB/s "
                    f"{t_mem / t:5.2f}x memcpy"
                )
        for op in ("gather", "scatter"):
            if op == "gather":
                whole, native, calls = profile(
                    lambda ids: kv.gather(ids, objs[0]),  # type: ignore[arg-type]
                    lambda: fresh(1)[0],
                )
            else:
                whole, native, calls = profile(
                    lambda ids: kv.scatter(objs[0], ids),  # type: ignore[arg-type]
                    lambda: fresh(1)[0],
                )
            print(
                f"  profile {op:7s} (1 thread): whole {whole * 1e6:7.1f} us = native copy "
                f"{native * 1e6:7.1f} us ({calls} calls) + numpy/Python {(whole - native) * 1e6:6.1f}"
                f" us; memcpy {t_mem1 * 1e6:6.1f} us"
            )
    finally:
        kv.close()
        for s in segs:
            s.destroy()


def spinner_share(work: Callable[[], object], seconds: float = 0.6) -> float:
    """Python-thread progress while ``work`` loops, relative to running alone."""

    def spin(stop: threading.Event, out: list[int]) -> None:
        n = 0
        while not stop.is_set():
            n += 1
        out.append(n)

    def measure(op: Callable[[], object]) -> int:
        stop, out = threading.Event(), []
        th = threading.Thread(target=spin, args=(stop, out))
        th.start()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            op()
        stop.set()
        th.join()
        return out[0]

    return measure(work) / measure(lambda: time.sleep(0.002))


LAYOUTS = {
    "NHD [2,NB,BS,NH,HS]": (lambda nb, bs: (2, nb, bs, 8, 128), "NHD"),
    "HND [2,NB,NH,BS,HS]": (lambda nb, bs: (2, nb, 8, bs, 128), "HND"),
    "vLLM-CPU [NB,NH,BS,2HS]": (lambda nb, bs: (nb, 8, bs, 256), "HND"),
}


def bench_layouts(runs: int, gil: bool) -> None:
    for bs in (16, 128):
        nb = max(2 * C // bs, 4)  # a few chunks' worth of blocks
        for layout, (phys, hint) in LAYOUTS.items():
            if not (gil and bs == 16 and layout.startswith("NHD")) and gil:
                continue
            segs, kv = engine(32, phys(nb, bs), hint)
            assert kv.object_nbytes == 32 * MIB
            ids = [int(x) for x in np.random.default_rng(2).permutation(nb)[: kv.blocks_per_chunk]]
            out = np.empty(kv.object_nbytes, np.uint8)
            tg = median_s(lambda kv=kv, ids=ids, out=out: kv.gather(ids, out), runs)
            ts = median_s(lambda kv=kv, ids=ids, out=out: kv.scatter(out, ids), runs)
            print(
                f"BS={bs:3d} {layout:24s} gather {tg * 1e3:6.2f} ms {32 * MIB / tg / 1e9:5.2f} GB/s"
                f" | scatter {ts * 1e3:6.2f} ms {32 * MIB / ts / 1e9:5.2f} GB/s"
            )
            if gil:
                gil_checks(kv, ids, out)
            kv.close()
            for s in segs:
                s.destroy()


def gil_checks(kv: PagedKV, ids: list[int], out: np.ndarray) -> None:
    share_g = spinner_share(lambda: kv.gather(ids, out))
    share_s = spinner_share(lambda: kv.scatter(out, ids))
    blob = bytearray(32 * MIB)
    share_held = spinner_share(lambda: bytes(blob))  # C copy, GIL held
    print(
        f"  GIL: a Python thread keeps {share_g:.0%} of its speed during gathers, "
        f"{share_s:.0%} during scatters ({share_held:.0%} during a GIL-holding "
        "32 MiB bytes() copy)"
    )
    out2 = np.empty_like(out)
    one = median_s(lambda: [kv.gather(ids, out) for _ in range(4)], 5)

    def two() -> None:
        th = threading.Thread(target=lambda: [kv.gather(ids, out2) for _ in range(2)])
        th.start()
        for _ in range(2):
            kv.gather(ids, out)
        th.join()

    both = median_s(two, 5)
    print(
        f"  4 gathers: one thread {one * 1e3:.1f} ms, two threads {both * 1e3:.1f} ms "
        f"({one / both:.2f}x; memory bandwidth bound)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometries", default=",".join(GEOMETRIES))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--layouts", action="store_true")
    ap.add_argument("--gil", action="store_true")
    ap.add_argument("--threads", type=int, help="COPY_THREADS (default: the module's)")
    ap.add_argument("--parallel-min-mib", type=float, help="PARALLEL_MIN_BYTES in MiB")
    a = ap.parse_args()
    if a.threads is not None:
        paged.COPY_THREADS = a.threads
    if a.parallel_min_mib is not None:
        paged.PARALLEL_MIN_BYTES = int(a.parallel_min_mib * MIB)
    for name in a.geometries.split(","):
        if name:
            bench_geometry(GEOMETRIES[name], a.runs)
    if a.layouts or a.gil:
        bench_layouts(a.runs, a.gil)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
