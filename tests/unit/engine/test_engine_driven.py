"""EngineDriven over a real L1: the shared-pool strategy (the worker copies in and out of
the L1 arena, mapped here as the worker maps it) and the pickle strategy (torch tensors),
with the lock contract checked at every step."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import C, FakeClock, build_engine, key

from kvhive.engine.engine import CacheEngine
from kvhive.errors import BadRequest, TransferFailed
from kvhive.storage.l1.arena import SHM_DIR
from kvhive.wire import types as t

TOKENS = list(range(1, 4 * C + 1))
LAYERS, HIDDEN = 2, 16  # object: [2, LAYERS, C, HIDDEN] float16
OBJ_BYTES = 2 * LAYERS * C * HIDDEN * 2


@pytest.fixture
def pooled() -> Iterator[tuple[CacheEngine, mmap.mmap]]:
    eng = build_engine(FakeClock(), pool=True, size_bytes=16 << 20)
    name = eng.engine_driven.pool_name
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)  # map the pool as the worker does
    try:
        worker_view = mmap.mmap(fd, 16 << 20)
    finally:
        os.close(fd)
    yield eng, worker_view
    worker_view.close()
    eng.registry.close()
    eng.l1.close()
    assert not os.path.exists(os.path.join(SHM_DIR, name))  # the server unlinked its pool


def payload(iid: int = 7) -> t.EngineDrivenPayload:
    return t.EngineDrivenPayload(iid, "m", 1, 16, LAYERS, HIDDEN, "float16", False, C)


def lookup(eng: CacheEngine, rid: str) -> int | None:
    eng.lookups.lookup(key(TOKENS, 0, 4 * C, rid=rid, worker=None), 1)
    return eng.lookups.query_prefetch_status(rid)


def test_shared_pool_store_then_retrieve_round_trip(pooled):
    eng, pool = pooled
    ed = eng.engine_driven
    reply = ed.register_kv_cache_engine_driven_context(payload())
    assert reply.shm_name == ed.pool_name and reply.pool_size == 16 << 20
    prep = ed.prepare_store(key(TOKENS, 0, 4 * C, rid="w"), 7)
    slots = prep.context["slots"]
    assert prep.context["chunk_indices"] == [0, 1, 2, 3]
    assert all(s["length"] >= OBJ_BYTES and s["shape"] == [2, LAYERS, C, HIDDEN] for s in slots)
    assert eng.l1.stats().staging_objects == 4  # reserved, invisible to lookups
    assert lookup(eng, "early") == 0
    eng.lookups.end_session("early")
    data = [np.random.default_rng(i).integers(0, 256, OBJ_BYTES, np.uint8) for i in range(4)]
    for s, d in zip(slots, data, strict=True):
        pool[s["offset"] : s["offset"] + OBJ_BYTES] = d.tobytes()
    assert ed.commit_store(key(TOKENS, 0, 4 * C, rid="w"), 7, b"") is True
    assert eng.counters["stored_chunks"] == 4

    assert lookup(eng, "r") == 4
    assert eng.l1.stats().read_locked_objects == 4
    got = ed.prepare_retrieve(key(TOKENS, 0, 4 * C, rid="r"), 7)
    assert got.success
    for s, d in zip(got.context["slots"], data, strict=True):
        assert pool[s["offset"] : s["offset"] + OBJ_BYTES] == d.tobytes()
    assert eng.l1.stats().read_locked_objects == 4  # pinned while the worker copies
    assert ed.commit_retrieve(key(TOKENS, 0, 4 * C, rid="r"), 7) is True
    assert eng.l1.stats().read_locked_objects == 0  # pin and lookup lock both back
    assert eng.counters["retrieved_chunks"] == 4


def test_commit_store_without_prepare_is_a_soft_failure(pooled):
    eng, _ = pooled
    eng.engine_driven.register_kv_cache_engine_driven_context(payload())
    with pytest.raises(TransferFailed, match="without prepare_store"):
        eng.engine_driven.commit_store(key(TOKENS, 0, 2 * C, rid="x"), 7, b"")


def test_prepare_retrieve_of_missing_chunks_fails_and_returns_the_lookup_locks(pooled):
    eng, _ = pooled
    ed = eng.engine_driven
    ed.register_kv_cache_engine_driven_context(payload())
    ed.prepare_store(key(TOKENS, 0, 2 * C, rid="w"), 7)
    ed.commit_store(key(TOKENS, 0, 2 * C, rid="w"), 7, b"")
    assert lookup(eng, "r") == 2
    with pytest.raises(TransferFailed, match="no longer in L1"):
        ed.prepare_retrieve(key(TOKENS, 0, 4 * C, rid="r"), 7)  # chunks 2-3 were never stored
    assert eng.l1.stats().read_locked_objects == 0
    assert eng.counters["retrieve_failures"] == 1


def test_unregister_drops_pins_and_pending_transfers(pooled):
    eng, _ = pooled
    ed = eng.engine_driven
    ed.register_kv_cache_engine_driven_context(payload())
    ed.prepare_store(key(TOKENS, 0, 2 * C, rid="w"), 7)
    ed.commit_store(key(TOKENS, 0, 2 * C, rid="w"), 7, b"")
    ed.prepare_store(key(TOKENS, 2 * C, 4 * C, rid="w"), 7)  # never committed
    assert lookup(eng, "r") == 2
    assert ed.prepare_retrieve(key(TOKENS, 0, 2 * C, rid="r"), 7).success
    ed.unregister_kv_cache_engine_driven_context(7)
    stats = eng.l1.stats()
    assert stats.read_locked_objects == 0 and stats.staging_objects == 0
    assert not ed._pending_stores and not ed._pending_reads
    with pytest.raises(BadRequest, match="not registered"):
        ed.commit_retrieve(key(TOKENS, 0, 2 * C, rid="r"), 7)


def test_bad_registration_values_are_refused(pooled):
    eng, _ = pooled
    bad = t.EngineDrivenPayload(7, "m", 1, 16, 0, HIDDEN, "float16", False, C)
    with pytest.raises(BadRequest, match="num_layers"):
        eng.engine_driven.register_kv_cache_engine_driven_context(bad)
    unknown = t.EngineDrivenPayload(7, "m", 1, 16, LAYERS, HIDDEN, "float13", False, C)
    with pytest.raises(BadRequest, match="unknown dtype"):
        eng.engine_driven.register_kv_cache_engine_driven_context(unknown)
    assert eng.registry.snapshot() == []


def test_pickle_strategy_round_trip():
    torch = pytest.importorskip("torch")
    from kvhive.transfer import pickle_codec

    eng = build_engine(FakeClock(), size_bytes=16 << 20)
    ed = eng.engine_driven
    try:
        assert ed.register_kv_cache_engine_driven_context(payload()).shm_name == ""
        assert ed.prepare_store(key(TOKENS, 0, 2 * C, rid="w"), 7).context == {}
        chunks = [torch.randn(2, LAYERS, C, HIDDEN, dtype=torch.float16) for _ in range(2)]
        raw = [c.view(torch.uint8).reshape(-1).numpy() for c in chunks]
        data = pickle_codec.encode_tensors(raw, (2, LAYERS, C, HIDDEN), "float16")
        assert ed.commit_store(key(TOKENS, 0, 2 * C, rid="w"), 7, data) is True
        with pytest.raises(TransferFailed, match="1 tensors for 2 chunks"):
            one = pickle_codec.encode_tensors(raw[:1], (2, LAYERS, C, HIDDEN), "float16")
            ed.commit_store(key(TOKENS, 0, 2 * C, rid="w2"), 7, one)

        eng.lookups.lookup(key(TOKENS, 0, 2 * C, rid="r", worker=None), 1)
        assert eng.lookups.query_prefetch_status("r") == 2
        got = ed.prepare_retrieve(key(TOKENS, 0, 2 * C, rid="r"), 7)
        assert got.success and eng.l1.stats().read_locked_objects == 0
        back = pickle_codec.decode_tensors(got.data)
        assert [b.tobytes() for b in back] == [r.tobytes() for r in raw]
        assert ed.commit_retrieve(key(TOKENS, 0, 2 * C, rid="r"), 7) is True
    finally:
        eng.registry.close()
        eng.l1.close()
