"""A real CacheEngine over a real L1 and real shared-memory KV caches (vLLM-CPU layout)."""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from _posixshmem import shm_open, shm_unlink
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from kvhive.engine.engine import CacheEngine
from kvhive.engine.registry import Registry
from kvhive.engine.sessions import Sessions
from kvhive.hashing import TokenHasher
from kvhive.storage.eviction import make_policy
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l1.records import L1Params
from kvhive.wire import types as t

C = 32  # chunk size (tokens)
BS = 16  # block size
NB = 24  # blocks per layer
NH, HS, NL = 2, 8, 3  # heads, head size, layers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class KVCache:
    """One worker's KV cache: per-layer [NB, NH, BS, 2*HS] fp16 in its own shm segment."""

    names: list[str]
    maps: list[mmap.mmap]

    @property
    def layers(self) -> list[np.ndarray]:
        return [np.frombuffer(m, dtype=np.uint16).reshape(NB, NH, BS, 2 * HS) for m in self.maps]

    def descriptors(self) -> list[t.CpuShmDescriptor]:
        shape = [NB, NH, BS, 2 * HS]
        stride = [NH * BS * 2 * HS, BS * 2 * HS, 2 * HS, 1]
        return [
            t.CpuShmDescriptor(
                version=1,
                metadata=t.TensorMetadata("float16", shape, stride, 0, "cpu"),
                shm_name="/" + n,
                nbytes=NB * NH * BS * 2 * HS * 2,
            )
            for n in self.names
        ]

    def token_rows(self, block_ids: list[int]) -> np.ndarray:
        """[layers, tokens, NH, 2HS] view of the given blocks, token-major (for comparing)."""
        return np.stack(
            [np.concatenate([lay[b].transpose(1, 0, 2) for b in block_ids]) for lay in self.layers]
        )


@pytest.fixture
def make_kv() -> Iterator:
    made: list[KVCache] = []
    rng = np.random.default_rng(7)

    def make() -> KVCache:
        names, maps = [], []
        size = NB * NH * BS * 2 * HS * 2
        for _ in range(NL):
            name = f"kvhive_eng_{uuid.uuid4().hex[:10]}"
            fd = shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
            os.close(fd)
            m[:] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            names.append(name)
            maps.append(m)
        kv = KVCache(names, maps)
        made.append(kv)
        return kv

    yield make
    for kv in made:
        for n in kv.names:
            with contextlib.suppress(FileNotFoundError):
                shm_unlink("/" + n)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[CacheEngine]:
    l1 = L1Manager(
        L1Params(
            size_bytes=64 << 20,
            align_bytes=4096,
            lazy=False,
            init_bytes=0,
            write_ttl=600.0,
            read_ttl=300.0,
            watermark=0.8,
            eviction_ratio=0.2,
            shm_name="",
        ),
        policy=make_policy("LRU"),
        clock=clock,
    )
    eng = CacheEngine(
        l1=l1,
        sessions=Sessions(TokenHasher("blake3", C), ttl=600.0, clock=clock),
        registry=Registry(reap_timeout=120.0, registration_grace=3600.0, clock=clock),
        transfer_modes=frozenset({"lmcache_driven", "engine_driven"}),
        null_block_id=0,
    )
    yield eng
    eng.registry.close()
    l1.close()


def key(
    tokens: list[int],
    start: int,
    end: int,
    *,
    rid: str = "r1",
    worker: int | None = 0,
    readers: int = 1,
    model: str = "m",
) -> t.CacheKey:
    return t.CacheKey(model, 1, worker, tokens, start, end, rid, "", None, readers)


def register(eng: CacheEngine, kv: KVCache, iid: int = 11) -> None:
    eng.transfers.register_kv_cache(iid, kv.descriptors(), "m", 1, "vllm", {"kv_layout": "HND"}, [])
