"""A real CacheEngine over a real L1 and real shared-memory KV caches (vLLM-CPU layout)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from kvhive.engine.engine import CacheEngine
from kvhive.engine.registry import Registry
from kvhive.engine.sessions import Sessions
from kvhive.hashing import TokenHasher
from kvhive.observability.health import InFlight
from kvhive.wire import types as t
from support.l1 import make_l1
from support.shm import KVGeometry, ShmKV, make_shm_kv

C = 32  # chunk size (tokens)
GEOMETRY = KVGeometry()  # 24 blocks of 16 tokens, 2 heads of size 8, 3 layers
BS = GEOMETRY.block_size


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_kv() -> Iterator[Callable[[], ShmKV]]:
    """Factory of worker KV caches (:class:`support.shm.ShmKV`, vLLM-CPU layout, random bytes
    from one generator seeded 7); all unlinked afterwards."""
    made: list[ShmKV] = []
    rng = np.random.default_rng(7)

    def make() -> ShmKV:
        kv = make_shm_kv(rng, prefix="kvhive_eng_", geometry=GEOMETRY)
        made.append(kv)
        return kv

    yield make
    for kv in made:
        kv.destroy()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def build_engine(
    clock: FakeClock, *, pool: bool = False, null_block_id: int = 0, size_bytes: int = 64 << 20
) -> CacheEngine:
    """A CacheEngine on ``clock`` with both transfer modes and an L1 of ``size_bytes``;
    with ``pool`` that L1 is a shared pool (engine-driven clients map it by its name).
    The caller closes its registry and L1."""
    shm = f"kvhive-eng-test-{uuid.uuid4().hex[:8]}" if pool else ""
    l1 = make_l1(size_bytes=size_bytes, shm_name=shm, manager_kwargs={"clock": clock})
    return CacheEngine(
        l1=l1,
        sessions=Sessions(TokenHasher("blake3", C), ttl=600.0, clock=clock),
        registry=Registry(reap_timeout=120.0, registration_grace=3600.0, clock=clock),
        transfer_modes=frozenset({"lmcache_driven", "engine_driven"}),
        null_block_id=null_block_id,
        inflight=InFlight(60.0),
        pool_name=l1.arena.shm_segment_name,
        pool_size=size_bytes if pool else 0,
    )


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[CacheEngine]:
    eng = build_engine(clock)
    yield eng
    eng.registry.close()
    eng.l1.close()


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


def register(eng: CacheEngine, kv: ShmKV, iid: int = 11) -> None:
    eng.transfers.register_kv_cache(iid, kv.descriptors(), "m", 1, "vllm", {"kv_layout": "HND"}, [])
