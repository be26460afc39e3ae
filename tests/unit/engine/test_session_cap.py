"""Sessions stay bounded under a flood of requests that never end (issue 10, fault 8).

Before: 300 lookups of 32,768 tokens with distinct request ids and no ``end_session`` kept
~38 bytes per token (the token list as Python ints) until the 600 s session TTL, and the
session table had no bound.  Now tokens are kept as uint32 and the table is LRU-capped;
an evicted session gives its locks back as ``end_session`` does and is counted.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from conftest import C, FakeClock, key, register

from kvhive.engine.engine import CacheEngine
from kvhive.engine.registry import Registry
from kvhive.engine.sessions import MAX_SESSIONS, Sessions
from kvhive.errors import BadRequest
from kvhive.hashing import TokenHasher
from kvhive.keys import ObjectKey, RequestId, pack_kv_rank
from kvhive.observability.health import InFlight
from kvhive.storage.owners import LookupOwner
from support.l1 import make_l1
from support.shm import ShmKV

FLOOD_TOKENS = 32_768
FLOOD_REQUESTS = 300
MakeEngine = Callable[..., CacheEngine]
RANK = pack_kv_rank(1, 0)


@pytest.fixture
def make_engine(clock: FakeClock) -> Iterator[MakeEngine]:
    """Engines like the conftest ``engine`` whose session table holds ``max_sessions``
    (and chunks of ``chunk_size`` tokens: 256 is the flag default)."""
    made: list[CacheEngine] = []

    def make(max_sessions: int, chunk_size: int = C) -> CacheEngine:
        eng = CacheEngine(
            l1=make_l1(manager_kwargs={"clock": clock}),
            sessions=Sessions(
                TokenHasher("blake3", chunk_size), ttl=600.0, clock=clock, max_sessions=max_sessions
            ),
            registry=Registry(reap_timeout=120.0, registration_grace=3600.0, clock=clock),
            transfer_modes=frozenset({"lmcache_driven"}),
            null_block_id=0,
            inflight=InFlight(60.0),
        )
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.registry.close()
        eng.l1.close()


def flood(eng: CacheEngine, n: int, *, first: int = 0) -> None:
    """``n`` lookups of FLOOD_TOKENS fresh tokens (new int objects, as decoded off the
    wire), distinct request ids, never ended."""
    for i in range(first, first + n):
        base = 1_000_000 + i * FLOOD_TOKENS
        tokens = list(range(base, base + FLOOD_TOKENS))
        eng.lookups.lookup(key(tokens, 0, FLOOD_TOKENS, rid=f"flood-{i}", worker=None), 1)


def traced(*steps: Callable[[], None]) -> list[int]:
    """Bytes allocated (and still alive) since the start after each step (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = []
        for step in steps:
            step()
            gc.collect()
            out.append(tracemalloc.get_traced_memory()[0] - before)
        return out
    finally:
        tracemalloc.stop()


def test_a_session_keeps_about_four_bytes_per_token(
    make_engine: MakeEngine, make_kv: Callable[[], ShmKV]
) -> None:
    eng = make_engine(MAX_SESSIONS, chunk_size=256)
    register(eng, make_kv())  # lookups hash only for a registered layout
    (growth,) = traced(lambda: flood(eng, FLOOD_REQUESTS))
    assert len(eng.sessions) == FLOOD_REQUESTS
    per_token = growth / (FLOOD_REQUESTS * FLOOD_TOKENS)
    # tokens 4 B + chunk hashes and lookup keys (~0.6 B); it was ~38 B (379 MB for 300).
    assert per_token < 6.0, f"{growth / 2**20:.1f} MiB for the flood: {per_token:.1f} B/token"


def test_the_flood_is_capped_evicted_sessions_release_their_locks(
    make_engine: MakeEngine, make_kv: Callable[[], ShmKV]
) -> None:
    cap = 8
    eng = make_engine(cap)
    register(eng, make_kv())
    tokens = list(range(1, 4 * C + 1))
    eng.transfers.store(key(tokens, 0, 4 * C, rid="writer"), 11, [list(range(1, 9))], b"")
    eng.lookups.end_session("writer")
    for i in range(cap):  # cap readers hold 4 locks each and never end their sessions
        eng.lookups.lookup(key(tokens, 0, 4 * C, rid=f"r{i}", worker=None), 1)
        assert eng.lookups.query_prefetch_status(f"r{i}") == 4
    objects = [ObjectKey(h, "m", RANK) for h in TokenHasher("blake3", C).chunk_hashes(tokens)]
    eng.lookups.lookup(key(tokens, 0, 4 * C, rid="r0", worker=None), 1)  # r0 is used again
    for i in range(cap - 1):  # evicts r1..r7 (the least recently used), not r0
        eng.lookups.lookup(key([7] * C, 0, C, rid=f"new{i}", worker=None), 1)
    assert len(eng.sessions) == cap
    assert eng.counters["sessions_evicted"] == cap - 1
    assert eng.sessions.get("r0", create=False) is not None
    assert eng.sessions.get("r1", create=False) is None
    for i in range(1, cap):  # the evicted sessions gave their locks back
        assert eng.l1.unlock(objects, LookupOwner(RequestId(f"r{i}"), "m", RANK), 1) == 0
    assert eng.l1.stats().read_locked_objects == 4  # r0's
    eng.lookups.end_session("r0")
    assert eng.l1.stats().read_locked_objects == 0
    assert eng.status()["counters"]["sessions_evicted"] == cap - 1


def test_flood_memory_is_bounded_by_the_cap(
    make_engine: MakeEngine, make_kv: Callable[[], ShmKV]
) -> None:
    cap = 16
    eng = make_engine(cap, chunk_size=256)
    register(eng, make_kv())
    full, later = traced(lambda: flood(eng, cap), lambda: flood(eng, 4 * cap, first=cap))
    assert len(eng.sessions) == cap and eng.counters["sessions_evicted"] == 4 * cap
    assert full < cap * FLOOD_TOKENS * 6  # about 4.6 bytes per token of each session
    assert later - full < FLOOD_TOKENS  # four times the cap later: no growth beyond noise


def test_rewritten_and_invalid_token_lists(make_engine: MakeEngine) -> None:
    eng = make_engine(4)
    sessions = eng.sessions
    s = sessions.get("x")
    assert s is not None
    tokens = list(range(1, 3 * C + 1))
    first = sessions.hashes(s, tokens, 3)
    assert len(s.tokens.data) == 4 * len(tokens) and list(s.tokens) == tokens  # 4 bytes a token
    assert sessions.hashes(s, tokens, 2) == first[:2]  # a prefix of the cached chain
    rewritten = tokens[:C] + [9] * (2 * C)
    again = sessions.hashes(s, rewritten, 3)
    assert again[0] == first[0] and again[1:] != first[1:]
    assert again == TokenHasher("blake3", C).chunk_hashes(rewritten)
    with pytest.raises(BadRequest, match=r"0\.\.4294967295"):
        sessions.hashes(s, [-1] * C, 1)
    with pytest.raises(BadRequest, match=r"0\.\.4294967295"):
        sessions.hashes(s, [2**32] * C, 1)
