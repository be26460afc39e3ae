"""Write and read throughput of every L2 adapter type with 32 MiB objects, next to dd.

    .venv/bin/python benchmarks/l2_adapters.py [--objects 16] [--dir /var/tmp/kvhive-bench]

Each adapter stores ``--objects`` objects through kvhive's ManagedAdapter (the path the
write-behind controller uses, integrity trailer included for durable types), then loads
them back into aligned buffers and checks the bytes.  GB/s = GiB moved / wall seconds.
Reads follow writes, so file-backed reads come from the page cache unless the script may
drop caches (root); dd gives the same-conditions baseline for fs and fs_native.
redis-server and moto (S3) are started on free loopback ports when available.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import numpy as np

from kvhive.config.l2_adapters import parse_adapter
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.registry import build_adapter

MIB = 1 << 20
SIZE = 32 * MIB


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def aligned(n: int) -> np.ndarray:
    raw = np.empty(n + 4096, dtype=np.uint8)
    off = -raw.ctypes.data % 4096
    return raw[off : off + n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def bench(raw: dict[str, Any], n: int, data: list[np.ndarray], cold: bool) -> dict[str, float]:
    spec = parse_adapter(0, raw)
    adapter = ManagedAdapter(spec, build_adapter(spec))
    keys = [ObjectKey(os.urandom(8), "bench", pack_kv_rank(1, 0)) for _ in range(n)]
    try:
        t0 = time.perf_counter()
        ok = adapter.store(keys, [memoryview(d) for d in data[:n]]).result(600)
        write = time.perf_counter() - t0
        assert all(ok), ok
        if cold:
            drop_caches()
        bufs = [aligned(SIZE) for _ in range(n)]
        for buf in bufs:
            buf[:] = 0  # fault the pages in, as L1's arena is
        t0 = time.perf_counter()
        ok = adapter.load(keys, [memoryview(b) for b in bufs]).result(600)
        read = time.perf_counter() - t0
        assert all(ok), ok
        assert all(np.array_equal(a, b) for a, b in zip(bufs, data, strict=False))
    finally:
        adapter.close()
    gib = n * SIZE / 2**30
    return {"write_GBps": round(gib / write, 2), "read_GBps": round(gib / read, 2)}


def dd(path: str, n: int, cold: bool, direct: bool) -> dict[str, float]:
    flag = ["oflag=direct"] if direct else []
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=32M", f"count={n}", *flag],
                   check=True, capture_output=True)  # fmt: skip
    write = time.perf_counter() - t0
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=32M", *(["iflag=direct"] if direct else [])],
                   check=True, capture_output=True)  # fmt: skip
    read = time.perf_counter() - t0
    os.unlink(path)
    gib = n * SIZE / 2**30
    return {"write_GBps": round(gib / write, 2), "read_GBps": round(gib / read, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--objects", type=int, default=16)
    p.add_argument("--dir", default="/var/tmp/kvhive-bench")
    p.add_argument("--cold", action="store_true", help="drop the page cache before reads (root)")
    args = p.parse_args()
    n = args.objects
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.dir)
    rng = np.random.default_rng(0)
    data = [aligned(SIZE) for _ in range(n)]
    for d in data:
        d[:] = rng.integers(0, 256, SIZE, dtype=np.uint8)
    procs: list[subprocess.Popen] = []
    cases: dict[str, dict[str, Any]] = {
        "fs": {"type": "fs", "base_path": f"{work}/fs"},
        "fs_native": {"type": "fs_native", "base_path": f"{work}/fsn"},
        "fs_native+odirect": {"type": "fs_native", "base_path": f"{work}/fsd", "use_odirect": True},
        "mock(100 GiB/s)": {"type": "mock", "max_size_gb": 4, "mock_bandwidth_gb": 100},
        "raw_block": {"type": "raw_block", "device_path": f"{work}/raw.img", "slot_bytes": SIZE + 4096,
                      "capacity_bytes": (n + 2) * (SIZE + 4096) + (64 << 20), "meta_total_bytes": 64 << 20},
        "dax": {"type": "dax", "device_path": f"{work}/dax.img", "slot_bytes": SIZE,
                "max_dax_size_gb": (n + 2) * (SIZE + 8192) / 2**30},
    }  # fmt: skip
    gcc = shutil.which("gcc")
    if gcc:
        lib = f"{work}/libsample.so"
        src = os.path.join(os.path.dirname(__file__), "..", "tests", "l2", "sample_plugin.c")
        subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", lib, src, "-lpthread"], check=True)
        cases["native_plugin"] = {"type": "native_plugin", "library_path": lib}
    if shutil.which("redis-server"):
        port = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--bind", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL))  # fmt: skip
        wait_port(port)
        cases["resp"] = {"type": "resp", "host": "127.0.0.1", "port": port}
    try:
        import moto.server  # noqa: F401

        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        wait_port(port)
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/bench", method="PUT")
        )
        cases["s3(moto)"] = {"type": "s3", "s3_endpoint": f"http://127.0.0.1:{port}/bench",
                             "s3_region": "us-east-1", "aws_access_key_id": "x",
                             "aws_secret_access_key": "x", "s3_num_io_threads": 2}  # fmt: skip
    except ImportError:
        pass
    results: dict[str, Any] = {}
    try:
        results["dd (page cache)"] = dd(f"{work}/dd.bin", n, args.cold, direct=False)
        results["dd oflag/iflag=direct"] = dd(f"{work}/ddd.bin", n, args.cold, direct=True)
        for name, raw in cases.items():
            results[name] = bench(raw, n, data, args.cold)
            print(f"{name:24s} {results[name]}", flush=True)
        for name in ("dd (page cache)", "dd oflag/iflag=direct"):
            print(f"{name:24s} {results[name]}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"objects": n, "object_MiB": SIZE // MIB, "results": results}, indent=1))


if __name__ == "__main__":
    main()
