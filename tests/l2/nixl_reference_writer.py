"""Write objects with the REFERENCE's own ``DynamicNixlStoreL2Adapter`` (lmcache 0.5.6), for
``test_nixl_dynamic.py``.  Runs in the lmcache client venv, with a ``nixl`` shim on
PYTHONPATH that maps ``nixl._api`` to kvhive's ``nixl_cu12`` build (the client venv has none).

    python nixl_reference_writer.py <file_path> <shard_dirs true|false> <sizes,comma,separated>

Object i: model ``org/m``, kv_rank 0x01000100, group 0, hash = i as 8 big-endian bytes, salt
``s`` for odd i; bytes from ``numpy.random.default_rng(i)``.  The L1 arena is an anonymous
mmap with 4 KiB pages; ``meta.address`` is the offset in it (as lmcache's allocator gives).
Prints one ``@@KVHIVE_INTEROP_RESULT@@ {json}`` line.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.internal_api import L1MemoryDesc
from lmcache.v1.distributed.l2_adapters.nixl_store_dynamic_l2_adapter import (
    DynamicNixlStoreL2Adapter,
    DynamicNixlStoreL2AdapterConfig,
)

ALIGN = 4096


def main() -> None:
    path, shard, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    arena = mmap.mmap(-1, sum(sizes) + ALIGN)
    base = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    desc = L1MemoryDesc(ptr=base, size=len(arena) - ALIGN, align_bytes=ALIGN)
    params = {"file_path": path, "use_direct_io": "false", "max_capacity_gb": "1",
              "shard_dirs": shard}  # fmt: skip
    adapter = DynamicNixlStoreL2Adapter(
        DynamicNixlStoreL2AdapterConfig.from_dict({"backend": "POSIX", "backend_params": params}),
        desc,
    )
    keys, objs, offset = [], [], 0
    for i, n in enumerate(sizes):
        arena[offset : offset + n] = (
            np.random.default_rng(i).integers(0, 256, n, np.uint8).tobytes()
        )
        keys.append(ObjectKey(i.to_bytes(8, "big"), "org/m", 0x01000100, 0, "s" if i % 2 else ""))
        meta = SimpleNamespace(address=offset, phy_size=n, shape=torch.Size([n]), dtype=torch.uint8)
        objs.append(SimpleNamespace(meta=meta))
        offset += n
    task = adapter.submit_store_task(keys, objs)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    done: dict = {}
    while task not in done and time.monotonic() < deadline:
        done.update(adapter.pop_completed_store_tasks())
        time.sleep(0.01)
    result = done.get(task)
    adapter.close()
    print("@@KVHIVE_INTEROP_RESULT@@ " + json.dumps({"stored": repr(result)}), flush=True)


if __name__ == "__main__":
    main()
