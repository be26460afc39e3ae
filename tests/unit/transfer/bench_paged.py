"""Throughput and GIL behaviour of PagedKV (a script, not a test).

    PYTHONPATH=tests .venv/bin/python tests/unit/transfer/bench_paged.py

One 256-token chunk of an 8B-Llama-like model (32 layers x 2 x 8 heads x
128 dims, bf16 = 32 MiB), each layer in its own shared-memory segment as the
0.5.6 client creates them, random block ids; median of several runs next to
a plain 32 MiB ``np.copyto``.  Then: does a Python thread keep running while
a copy is in flight (GIL released), and do two copying threads overlap?
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import numpy as np

from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from support.descriptors import contiguous_strides
from support.shm import ShmSegment

NL, NH, HS, C = 32, 8, 128, 256
MIB = 1 << 20


def engine(layout: str, bs: int, nb: int) -> tuple[list[ShmSegment], PagedKV]:
    phys, shape, stride, hint = {
        "NHD [2,NB,BS,NH,HS]": ((2, nb, bs, NH, HS), None, None, "NHD"),
        "HND [2,NB,NH,BS,HS]": ((2, nb, NH, bs, HS), None, None, "HND"),
        "vLLM-CPU [NB,NH,BS,2HS]": ((nb, NH, bs, 2 * HS), None, None, "HND"),
    }[layout]
    segs, descs = [], []
    for _ in range(NL):
        n = int(np.prod(phys)) * 2
        s = ShmSegment(n).fill_random(np.random.default_rng(0))
        segs.append(s)
        descs.append(
            TensorDesc("bfloat16", shape or phys, stride or contiguous_strides(phys), 0, s.name, n)
        )
    return segs, PagedKV.from_descriptors(descs, {"kv_layout": hint}, [], C)


def median_s(fn, runs: int = 9) -> float:
    fn()  # warm up (page faults)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def spinner_share(work, seconds: float = 0.6) -> float:
    """Python-thread progress while ``work`` loops, relative to running alone."""

    def spin(stop: threading.Event, out: list[int]) -> None:
        n = 0
        while not stop.is_set():
            n += 1
        out.append(n)

    def measure(op) -> int:
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


def main() -> None:
    src = np.random.default_rng(1).integers(0, 256, 32 * MIB, dtype=np.uint8)
    dst = np.empty_like(src)
    t = median_s(lambda: np.copyto(dst, src))
    print(f"np.copyto 32 MiB: {t * 1e3:6.2f} ms  {32 * MIB / t / 1e9:5.2f} GB/s")
    for bs in (16, 128):
        nb = max(2 * C // bs, 4)  # a few chunks' worth of blocks
        for layout in ("NHD [2,NB,BS,NH,HS]", "HND [2,NB,NH,BS,HS]", "vLLM-CPU [NB,NH,BS,2HS]"):
            segs, kv = engine(layout, bs, nb)
            assert kv.object_nbytes == 32 * MIB
            ids = [int(x) for x in np.random.default_rng(2).permutation(nb)[: kv.blocks_per_chunk]]
            out = np.empty(kv.object_nbytes, np.uint8)
            tg = median_s(lambda kv=kv, ids=ids, out=out: kv.gather(ids, out))
            ts = median_s(lambda kv=kv, ids=ids, out=out: kv.scatter(out, ids))
            print(
                f"BS={bs:3d} {layout:24s} gather {tg * 1e3:6.2f} ms {32 * MIB / tg / 1e9:5.2f} GB/s"
                f" | scatter {ts * 1e3:6.2f} ms {32 * MIB / ts / 1e9:5.2f} GB/s"
            )
            if bs == 16 and layout.startswith("NHD"):
                share_g = spinner_share(lambda kv=kv, ids=ids, out=out: kv.gather(ids, out))
                share_s = spinner_share(lambda kv=kv, ids=ids, out=out: kv.scatter(out, ids))
                blob = bytearray(32 * MIB)
                share_held = spinner_share(lambda blob=blob: bytes(blob))  # C copy, GIL held
                print(
                    f"  GIL: a Python thread keeps {share_g:.0%} of its speed during gathers, "
                    f"{share_s:.0%} during scatters ({share_held:.0%} during a GIL-holding "
                    "32 MiB bytes() copy)"
                )
                out2 = np.empty_like(out)
                one = median_s(
                    lambda kv=kv, ids=ids, out=out: [kv.gather(ids, out) for _ in range(4)], 5
                )

                def two(kv=kv, ids=ids, out=out, out2=out2) -> None:
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
            kv.close()
            for s in segs:
                s.destroy()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
