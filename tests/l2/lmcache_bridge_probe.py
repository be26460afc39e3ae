"""LMCache 0.5.6's own L2 adapter classes under kvhive's ``plugin`` type, in-process.

Run by ``test_lmcache_bridge.py`` with the lmcache 0.5.6 client venv's python, kvhive's
``src`` first on ``PYTHONPATH`` and kvhive's dev-venv site-packages in ``KVHIVE_DEV_SITE``
(appended last, for the few kvhive dependencies that venv lacks, e.g. cbor2; lmcache's own
packages win).  Usage: ``lmcache_bridge_probe.py fs|mock DIR``; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

sys.path.append(os.environ["KVHIVE_DEV_SITE"])
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

from kvhive.config.l2_adapters import parse_adapter
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.l2.adapters.lmcache_bridge import LMCacheBridge
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.registry import build_adapter

MODULES = {
    "fs": ("lmcache.v1.distributed.l2_adapters.fs_l2_adapter", "FSL2Adapter"),
    "mock": ("lmcache.v1.distributed.l2_adapters.mock_l2_adapter", "MockL2Adapter"),
}


def wait(fut: Future) -> list[Any]:
    return [bool(x) for x in fut.result(timeout=30)]


def main() -> None:
    kind, where = sys.argv[1], Path(sys.argv[2])
    module, cls = MODULES[kind]
    params = (
        {"base_path": str(where)}
        if kind == "fs"
        else {"max_size_gb": 0.01, "mock_bandwidth_gb": 100.0}
    )
    spec = parse_adapter(0, {"type": "plugin", "module_path": module, "class_name": cls,
                             "adapter_params": params})  # fmt: skip
    adapter = build_adapter(spec)
    assert isinstance(adapter, LMCacheBridge), type(adapter)
    rng = random.Random(7)
    rank = pack_kv_rank(2, 1)
    keys = [ObjectKey(rng.randbytes(32), "org/model-x", rank, g, salt)
            for g, salt in ((0, ""), (1, ""), (0, "tenant-a"), (2, "tenant-b"))]  # fmt: skip
    payloads = [rng.randbytes(n) for n in (4096, 12_345, 1, 65_536)]
    absent = ObjectKey(rng.randbytes(32), "org/model-x", rank)
    out: dict[str, Any] = {"class": adapter.status()["lmcache_class"],
                           "capacity": adapter.capacity_bytes}  # fmt: skip

    # read-only views of bytes and a writable view of a bytearray, as L1 hands them out
    views = [memoryview(p) for p in payloads[:2]] + [memoryview(bytearray(p)) for p in payloads[2:]]
    out["store"] = wait(adapter.submit_store(keys, views))
    if kind == "fs":
        files = sorted(os.listdir(where))
        out["files"] = files
        out["files_exact"] = sorted(Path(where, f).read_bytes() for f in files) == sorted(payloads)
    out["lookup"] = wait(adapter.submit_lookup([*keys, absent]))
    if kind == "mock":  # the bridge unlocks the hits at once (the mock does it on its loop)
        deadline = time.monotonic() + 5
        while adapter.adapter.debug_get_locked_key_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        out["locked_after_lookup"] = adapter.adapter.debug_get_locked_key_count()
    bufs = [bytearray(len(p)) for p in payloads]
    load_keys, load_bufs = [*keys, absent], [*map(memoryview, bufs), memoryview(bytearray(8))]
    if kind == "fs":  # a buffer longer than the object: a short read (mock's copy would raise)
        load_keys.append(keys[1])
        load_bufs.append(memoryview(bytearray(len(payloads[1]) + 1)))
    out["load"] = wait(adapter.submit_load(load_keys, load_bufs))
    out["load_exact"] = [bytes(b) == p for b, p in zip(bufs, payloads, strict=True)]
    out["delete"] = wait(adapter.submit_delete([keys[0], keys[3], absent]))
    out["lookup_after_delete"] = wait(adapter.submit_lookup(keys))

    # the same adapter through kvhive's bookkeeping (capacity, usage, counters)
    managed = ManagedAdapter(spec, adapter)
    data = rng.randbytes(3000)
    out["managed_store"] = wait(managed.store([absent], [memoryview(data)]))
    out["managed_used"] = managed.tracker.usage().used_bytes
    back = bytearray(len(data))
    out["managed_load"] = wait(managed.load([absent], [memoryview(back)]))
    out["managed_exact"] = bytes(back) == data
    out["managed_delete"] = wait(managed.delete([absent]))
    out["managed_used_after"] = managed.tracker.usage().used_bytes
    t0 = time.monotonic()
    adapter.close()
    out["close_s"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
