"""Helpers shared by the L2 tests (imported by name: several test folders have a conftest)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kvhive.keys import ObjectKey, pack_kv_rank

KINDS = ("fs", "fs_native", "mock", "raw_block", "dax", "plugin", "native_plugin", "resp", "s3",
         "nixl_store", "nixl_store_dynamic", "valkey")  # fmt: skip
DURABLE = ("fs", "fs_native", "raw_block", "dax", "resp", "s3", "nixl_store_dynamic")
WAIT_S = 20.0


def keys_for(
    n: int, *, salt: str = "", model: str = "org/model", start: int = 0
) -> list[ObjectKey]:
    rank = pack_kv_rank(1, 0)
    return [ObjectKey(os.urandom(4) + i.to_bytes(4, "big"), model, rank, 0, salt)
            for i in range(start, start + n)]  # fmt: skip


def payloads(n: int, nbytes: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [aligned_copy(rng.integers(0, 256, nbytes, dtype=np.uint8)) for _ in range(n)]


def aligned_copy(data: np.ndarray, align: int = 4096) -> np.ndarray:
    """A copy of ``data`` whose first byte sits on an ``align`` boundary (for O_DIRECT)."""
    raw = np.empty(data.nbytes + align, dtype=np.uint8)
    off = -raw.ctypes.data % align
    out = raw[off : off + data.nbytes]
    out[:] = data
    return out


def done(fut: Any) -> list[bool]:
    return list(fut.result(timeout=WAIT_S))
