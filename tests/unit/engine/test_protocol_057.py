"""0.5.7's changes over a real engine: packed-token keys, lookups that start past the
engine's prefix-cache hit, abandoned lookups' ``extra_ranges``, ``skipped_chunks``,
``negotiate_chunk_size`` and engine-driven tensor envelopes -- next to 0.5.6 requests."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import numpy as np
import pytest
from conftest import C, FakeClock, build_engine, register

from kvhive.engine.engine import CacheEngine
from kvhive.engine.retired import MAX_RETIRED
from kvhive.engine.sessions import Sessions
from kvhive.errors import BadRequest, UnsupportedError
from kvhive.hashing import TokenHasher
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.owners import LookupOwner
from kvhive.transfer import pickle_codec
from kvhive.transfer import tensor_envelope as te
from kvhive.wire import types as t

TOKENS = list(range(1, 4 * C + 1))  # 4 full chunks
BLOCKS = list(range(1, 9))  # 2 blocks per chunk
RANK = pack_kv_rank(1, 0)


def key(
    tokens: list[int],
    start: int,
    end: int,
    *,
    rid: str = "r1",
    worker: int | None = 0,
    packed: bool = True,
    readers: int = 1,
) -> t.CacheKey:
    toks: list[int] | t.PackedTokens = t.pack_tokens(tokens) if packed else tokens
    return t.CacheKey("m", 1, worker, toks, start, end, rid, "", None, readers)


def lookup(eng: CacheEngine, rid: str, start: int = 0, *, packed: bool = True) -> int | None:
    eng.lookups.lookup(key(TOKENS, start, 4 * C, rid=rid, worker=None, packed=packed), 1)
    return eng.lookups.query_prefetch_status(rid)


def lock_counts(eng: CacheEngine, rid: str) -> list[int]:
    """Lookup locks ``rid`` holds on each of the 4 chunks (read by taking them all back)."""
    hashes = TokenHasher("blake3", C).chunk_hashes(TOKENS)
    owner = LookupOwner(rid, "m", RANK)
    return [eng.l1.unlock([ObjectKey(h, "m", RANK)], owner, 100) for h in hashes]


@pytest.fixture
def stored(engine, make_kv) -> CacheEngine:
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [BLOCKS], b"")
    return engine


# ---- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["blake3", "sha256_cbor", "builtin"])
def test_packed_and_int_tokens_hash_alike(algorithm):
    h = TokenHasher(algorithm, C)
    packed = t.pack_tokens(TOKENS)
    assert h.chunk_hashes(packed, end=3 * C + 5) == h.chunk_hashes(TOKENS, end=3 * C + 5)
    first = h.chunk_hashes(TOKENS[: 2 * C])
    assert h.extend(first, packed, 4) == h.chunk_hashes(TOKENS)[2:]


def test_a_chunk_stored_by_one_version_is_found_by_the_other(stored):
    assert stored.l1.stats().objects == 4
    assert lookup(stored, "old", packed=False) == 4
    assert lookup(stored, "new") == 4
    stored.lookups.end_session("old")
    stored.lookups.end_session("new")
    assert stored.l1.stats().read_locked_objects == 0


def test_a_packed_key_is_hashed_and_cached_from_its_own_bytes():
    """Zero copy end to end: the session keeps a view of the decoded frame, no ints, no copy."""
    frame = bytearray(t.pack_tokens(TOKENS).data)
    sessions = Sessions(TokenHasher("blake3", C), ttl=60.0)
    s = sessions.get("r")
    assert s is not None
    got = sessions.hashes(s, t.PackedTokens(frame), 3)
    assert got == TokenHasher("blake3", C).chunk_hashes(TOKENS)[:3]
    assert s.tokens.data.obj is frame and len(s.tokens) == 3 * C
    assert sessions.hashes(s, TOKENS, 4)[:3] == got  # the chain is reused for a list too


def test_session_cache_serves_either_form():
    sessions = Sessions(TokenHasher("blake3", C), ttl=60.0)
    s = sessions.get("r")
    assert s is not None
    a = sessions.hashes(s, t.pack_tokens(TOKENS), 2)
    assert s.tokens.tolist() == TOKENS[: 2 * C]  # kept compactly, as for a list
    assert sessions.hashes(s, TOKENS, 4)[:2] == a  # the cached chain is reused
    rewritten = [9, *TOKENS[1:]]
    assert sessions.hashes(s, t.pack_tokens(rewritten), 4) == TokenHasher("blake3", C).chunk_hashes(
        rewritten
    )


# ---- lookups that start past the engine's prefix-cache hit ------------------------------


def test_a_057_lookup_from_start_locks_only_past_it_and_reports_absolute_hits(stored):
    assert lookup(stored, "q", start=2 * C) == 4
    assert lock_counts(stored, "q") == [0, 0, 1, 1]


def test_a_057_lookup_that_misses_past_start_reports_start(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 2 * C), 11, [BLOCKS[:4]], b"")
    assert lookup(engine, "q", start=3 * C) == 3  # the engine holds 3, kvhive nothing past
    assert lookup(engine, "all", start=4 * C) == 4
    assert engine.l1.stats().read_locked_objects == 0


def test_a_056_lookup_ignores_start(stored):
    assert lookup(stored, "q", start=2 * C, packed=False) == 4
    assert lock_counts(stored, "q") == [1, 1, 1, 1]


def test_free_lookup_locks_stays_above_the_lookup_start_and_takes_whole_chunks(stored):
    assert lookup(stored, "q", start=C) == 4
    # frees chunk 1 only: chunk 0 was never locked, chunk 2 is cut by end (still to load)
    stored.lookups.free_lookup_locks(key(TOKENS, 0, 2 * C + 16, rid="q", worker=None), 1)
    assert lock_counts(stored, "q") == [0, 0, 1, 1]


# ---- extra_ranges: abandoned lookups -----------------------------------------------------


def abandon_then_relook(eng: CacheEngine, rid: str = "q") -> None:
    """0.5.7's prefix-cache shrink: lookup A from 2C is reported, then a full lookup B."""
    assert lookup(eng, rid, start=2 * C) == 4  # A: locks chunks 2, 3
    assert lookup(eng, rid) == 4  # B: locks chunks 0..3; A is retired, its locks kept
    assert eng.l1.stats().read_locked_objects == 4


def free(eng: CacheEngine, rid: str, start: int, end: int, *extra: tuple[int, int]) -> None:
    eng.lookups.free_lookup_locks(key(TOKENS, start, end, rid=rid, worker=None), 1, extra)


def test_extra_ranges_release_the_abandoned_lookup_once(stored):
    abandon_then_relook(stored)
    free(stored, "q", 0, 0, (2 * C, 4 * C))
    free(stored, "q", 0, 0, (2 * C, 4 * C))  # again: nothing left to give back
    free(stored, "q", 0, 0, (C, 3 * C))  # no abandoned lookup hit 3 chunks: nothing
    assert lock_counts(stored, "q") == [1, 1, 1, 1]  # exactly the current lookup's


def test_extra_ranges_with_the_main_range_in_one_call(stored):
    abandon_then_relook(stored)
    free(stored, "q", 0, 4 * C, (2 * C, 4 * C))
    assert stored.l1.stats().read_locked_objects == 0


def test_a_narrower_extra_range_releases_its_part_and_the_rest_later(stored):
    abandon_then_relook(stored)
    free(stored, "q", 0, 0, (3 * C, 4 * C))
    free(stored, "q", 0, 0, (2 * C, 4 * C))  # the rest: chunk 2 only
    free(stored, "q", 0, 0, (0, 4 * C))  # floored to A's start: nothing more
    assert lock_counts(stored, "q") == [1, 1, 1, 1]


def test_extra_ranges_without_a_retired_lookup_release_nothing(stored):
    assert lookup(stored, "q") == 4
    free(stored, "q", 0, 0, (0, 4 * C))  # would be the current lookup's locks
    assert lock_counts(stored, "q") == [1, 1, 1, 1]


def test_end_session_releases_retired_lookups_too(stored):
    abandon_then_relook(stored)
    stored.lookups.end_session("q")
    assert stored.l1.stats().read_locked_objects == 0


def test_retired_lookups_are_bounded(stored):
    for _ in range(MAX_RETIRED + 3):
        assert lookup(stored, "q", start=2 * C) == 4
    session = stored.sessions.get("q", create=False)
    assert session is not None and len(session.retired) == MAX_RETIRED
    stored.lookups.end_session("q")
    assert stored.l1.stats().read_locked_objects == 0


# ---- negotiate_chunk_size ----------------------------------------------------------------


def test_negotiate_chunk_size(engine):
    assert engine.negotiate_chunk_size(16) == C and engine.negotiate_chunk_size(C) == C
    with pytest.raises(
        BadRequest, match=r"--chunk-size 32 is not a multiple .* 48.*--chunk-size 48"
    ):
        engine.negotiate_chunk_size(48)
    with pytest.raises(BadRequest, match="must be >= 1"):
        engine.negotiate_chunk_size(0)


# ---- engine-driven: registration, envelopes, skipped chunks --------------------------------

LAYERS, HIDDEN = 2, 16
SHAPE = (2, LAYERS, C, HIDDEN)
OBJ_BYTES = 2 * LAYERS * C * HIDDEN * 2
LAYOUT = te.TensorLayout.of(SHAPE, "float16")


@pytest.fixture
def inline() -> Iterator[CacheEngine]:
    eng = build_engine(FakeClock(), null_block_id=5, size_bytes=16 << 20)
    yield eng
    eng.registry.close()
    eng.l1.close()


@pytest.fixture
def pooled() -> Iterator[CacheEngine]:
    eng = build_engine(FakeClock(), pool=True, size_bytes=16 << 20)
    yield eng
    eng.registry.close()
    eng.l1.close()


def payload057(iid: int = 7, layouts: list[t.GroupLayout] | None = None) -> t.EngineDrivenPayload:
    return t.EngineDrivenPayload(
        iid, "m", 1, 16, LAYERS, HIDDEN, "float16", False, C, layouts if layouts is not None else []
    )


def chunk_bytes(n: int, seed: int = 3) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, OBJ_BYTES, np.uint8).tobytes() for _ in range(n)]


def test_a_057_registration_needs_no_torch_and_gets_null_block_id(inline, monkeypatch):
    monkeypatch.setattr(pickle_codec, "torch_available", lambda: False)
    ed = inline.engine_driven
    reply = ed.register_kv_cache_engine_driven_context(payload057())
    assert (reply.shm_name, reply.pool_size, reply.null_block_id) == ("", 0, 5)
    with pytest.raises(UnsupportedError, match=r"0\.5\.6 worker\) needs torch"):
        ed.register_kv_cache_engine_driven_context(
            t.EngineDrivenPayload(8, "m", 1, 16, LAYERS, HIDDEN, "float16", False, C)
        )


def test_a_056_registration_gets_its_old_reply(inline):
    pytest.importorskip("torch")
    reply = inline.engine_driven.register_kv_cache_engine_driven_context(
        t.EngineDrivenPayload(8, "m", 1, 16, LAYERS, HIDDEN, "float16", False, C)
    )
    assert reply.null_block_id is msgspec.UNSET


def test_envelope_round_trip_is_byte_exact(inline, monkeypatch):
    monkeypatch.setattr(pickle_codec, "torch_available", lambda: False)
    ed = inline.engine_driven
    ed.register_kv_cache_engine_driven_context(payload057())
    assert ed.prepare_store(key(TOKENS, 0, 4 * C, rid="w"), 7).context == {}
    data = chunk_bytes(4)
    assert ed.commit_store(key(TOKENS, 0, 4 * C, rid="w"), 7, te.encode_tensors(data, LAYOUT))
    assert inline.counters["stored_chunks"] == 4

    assert lookup(inline, "r") == 4
    got = ed.prepare_retrieve(key(TOKENS, 0, 4 * C, rid="r"), 7)
    assert got.success and te.payload_form(got.data) == "envelope"
    assert [bytes(b) for b in te.decode_tensors(got.data, LAYOUT, 4)] == data
    assert inline.l1.stats().read_locked_objects == 0  # released inside prepare_retrieve
    assert ed.commit_retrieve(key(TOKENS, 0, 4 * C, rid="r"), 7) is True


def test_a_grouped_envelope_of_the_one_group_stores_the_chunks_it_names(inline):
    ed = inline.engine_driven
    ed.register_kv_cache_engine_driven_context(payload057())
    data = chunk_bytes(2)
    env = te.encode_grouped([([1, 3], data, LAYOUT)])
    assert ed.commit_store(key(TOKENS, 0, 4 * C, rid="w"), 7, env)
    assert inline.l1.stats().objects == 2
    with pytest.raises(BadRequest, match="groups holds 2 groups, 1 registered"):
        two = te.encode_grouped([([0], data[:1], LAYOUT), ([0], data[:1], LAYOUT)])
        ed.commit_store(key(TOKENS, 0, 4 * C, rid="w"), 7, two)


@pytest.mark.parametrize(
    ("layout", "count", "names"),
    [
        (te.TensorLayout.of(SHAPE, "bfloat16"), 2, "tensors[0].dtype 'bfloat16'"),
        (te.TensorLayout.of((2, LAYERS, C // 2, HIDDEN * 2), "float16"), 2, "tensors[0].shape"),
        (LAYOUT, 1, "tensors holds 1 tensors for 2 chunks"),
    ],
)
def test_envelopes_that_do_not_match_the_registration_are_refused(inline, layout, count, names):
    ed = inline.engine_driven
    ed.register_kv_cache_engine_driven_context(payload057())
    env = te.encode_tensors([b"\0" * OBJ_BYTES] * count, layout)
    with pytest.raises(BadRequest) as err:
        ed.commit_store(key(TOKENS, 0, 2 * C, rid="w"), 7, env)
    assert names in str(err.value)
    assert inline.l1.stats().objects == 0 and inline.l1.stats().staging_objects == 0


def test_retrieves_follow_the_form_the_commits_use(inline):
    torch = pytest.importorskip("torch")
    ed = inline.engine_driven
    ed.register_kv_cache_engine_driven_context(payload057())  # envelope by registration
    chunks = [torch.randn(*SHAPE, dtype=torch.float16) for _ in range(2)]
    raw = [c.view(torch.uint8).reshape(-1).numpy() for c in chunks]
    pickled = pickle_codec.encode_tensors(raw, SHAPE, "float16")
    assert ed.commit_store(key(TOKENS, 0, 2 * C, rid="w"), 7, pickled)  # a pickle switches it
    assert lookup(inline, "r") == 2
    got = ed.prepare_retrieve(key(TOKENS, 0, 2 * C, rid="r"), 7)
    assert te.payload_form(got.data) == "pickle"
    assert [b.tobytes() for b in pickle_codec.decode_tensors(got.data)] == [
        r.tobytes() for r in raw
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_layers": 3}, "num_layers"),
        ({"dtype_str": "bfloat16"}, "dtype_str"),
        ({"window_tokens": 16}, "window_tokens"),
        ({"window_chunks": 2}, "window_chunks"),
        ({"recurrent": True}, "recurrent"),
        ({"kv_size": 1}, "kv_size"),
    ],
)
def test_one_group_layout_must_describe_the_registered_object(inline, change, field):
    base = {"num_layers": LAYERS, "hidden_dim_size": HIDDEN, "dtype_str": "float16"}
    ok = t.GroupLayout(**base, tokens_per_block=16, window_tokens=C, kv_size=2)
    inline.engine_driven.register_kv_cache_engine_driven_context(payload057(layouts=[ok]))
    bad = t.GroupLayout(**{**base, "tokens_per_block": 16, **change})
    with pytest.raises(UnsupportedError, match=rf"group_layouts\[0\]\.{field}"):
        inline.engine_driven.register_kv_cache_engine_driven_context(payload057(8, [bad]))


def test_multi_group_registrations_are_refused(inline):
    g = t.GroupLayout(LAYERS, HIDDEN, "float16", 16)
    with pytest.raises(UnsupportedError, match="lists 2 LMCache groups"):
        inline.engine_driven.register_kv_cache_engine_driven_context(payload057(layouts=[g, g]))
    assert inline.registry.snapshot() == []


def test_skipped_chunks_get_no_slot_on_the_shared_pool(pooled):
    ed = pooled.engine_driven
    ed.register_kv_cache_engine_driven_context(payload057())
    prep = ed.prepare_store(key(TOKENS, 0, 4 * C, rid="w"), 7, [[0, 2]])
    assert prep.context["chunk_indices"] == [1, 3] and len(prep.context["slots"]) == 2
    assert pooled.l1.stats().staging_objects == 2
    assert ed.commit_store(key(TOKENS, 0, 4 * C, rid="w"), 7, b"")
    assert pooled.l1.stats().objects == 2
    assert ed.prepare_store(key(TOKENS, 0, 4 * C, rid="x"), 7, [[0, 1, 2, 3]]).context == {
        "slots": [],
        "chunk_indices": [],
    }


@pytest.mark.parametrize(
    ("skipped", "names"),
    [([[0], [1]], "skipped_chunks has 2 groups"), ([[4]], "outside the 4 in range")],
)
def test_bad_skipped_chunks_are_refused(pooled, skipped, names):
    ed = pooled.engine_driven
    ed.register_kv_cache_engine_driven_context(payload057())
    with pytest.raises(BadRequest, match=names):
        ed.prepare_store(key(TOKENS, 0, 4 * C, rid="w"), 7, skipped)
    assert pooled.l1.stats().staging_objects == 0
