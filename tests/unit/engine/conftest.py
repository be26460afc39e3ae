"""A real CacheEngine over a real L1 and real shared-memory KV caches (vLLM-CPU layout)."""

from __future__ import annotations

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


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[CacheEngine]:
    l1 = make_l1(manager_kwargs={"clock": clock})
    eng = CacheEngine(
        l1=l1,
        sessions=Sessions(TokenHasher("blake3", C), ttl=600.0, clock=clock),
        registry=Registry(reap_timeout=120.0, registration_grace=3600.0, clock=clock),
        transfer_modes=frozenset({"lmcache_driven", "engine_driven"}),
        null_block_id=0,
        inflight=InFlight(60.0),
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


def register(eng: CacheEngine, kv: ShmKV, iid: int = 11) -> None:
    eng.transfers.register_kv_cache(iid, kv.descriptors(), "m", 1, "vllm", {"kv_layout": "HND"}, [])
