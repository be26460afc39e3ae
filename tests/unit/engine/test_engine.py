"""CacheEngine over real L1 + real shm KV caches: store, lookup, locks, retrieve."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import BS, C, key, register

from kvhive.engine.transfers import RetrieveResult, StoreResult
from kvhive.errors import TransferFailed
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.owners import LookupOwner

TOKENS = list(range(1, 4 * C + 1))  # 4 full chunks
BLOCKS_A = list(range(1, 9))  # 8 blocks = 4 chunks of 2 blocks
BLOCKS_B = list(range(10, 18))


def lookup_hits(eng, tokens, rid="q", readers=1):
    eng.lookups.lookup(key(tokens, 0, len(tokens), rid=rid, worker=None, readers=readers), 1)
    return eng.lookups.query_prefetch_status(rid)


def test_store_lookup_retrieve_roundtrip(engine, make_kv):
    a, b = make_kv(), make_kv()
    register(engine, a, 1)
    register(engine, b, 2)
    assert engine.transfers.store(key(TOKENS, 0, 4 * C), 1, [BLOCKS_A], b"") == StoreResult(4, 0)
    assert engine.l1.stats().objects == 4
    assert lookup_hits(engine, TOKENS) == 4
    assert engine.lookups.query_prefetch_status("q") == 0  # reported exactly once
    got = engine.transfers.retrieve(key(TOKENS, 0, 4 * C, rid="q"), 2, [BLOCKS_B], b"", 0)
    assert got == RetrieveResult(4)
    np.testing.assert_array_equal(a.token_rows(BLOCKS_A), b.token_rows(BLOCKS_B))
    assert engine.l1.stats().read_locked_objects == 0  # the retrieve released its locks


def test_partial_and_zero_hits(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 2 * C), 11, [BLOCKS_A[:4]], b"")
    diverged = TOKENS[: 2 * C] + [7] * (2 * C)
    assert lookup_hits(engine, diverged, rid="p") == 2
    assert lookup_hits(engine, [9] * (4 * C), rid="z") == 0
    assert lookup_hits(engine, TOKENS[: C - 1], rid="short") == 0  # no complete chunk


def test_lookup_before_any_registration_misses(engine, make_kv):
    assert lookup_hits(engine, TOKENS) == 0


def test_skip_first_tokens_leaves_leading_blocks(engine, make_kv):
    a, b = make_kv(), make_kv()
    register(engine, a, 1)
    register(engine, b, 2)
    engine.transfers.store(key(TOKENS, 0, 4 * C), 1, [BLOCKS_A], b"")
    lookup_hits(engine, TOKENS)
    before = b.token_rows(BLOCKS_B[:3]).copy()
    engine.transfers.retrieve(key(TOKENS, 0, 4 * C, rid="q"), 2, [BLOCKS_B], b"", 3 * BS + 5)
    np.testing.assert_array_equal(b.token_rows(BLOCKS_B[:3]), before)  # floor(53/16)=3 blocks kept
    np.testing.assert_array_equal(b.token_rows(BLOCKS_B[3:]), a.token_rows(BLOCKS_A[3:]))


def test_null_chunks_skipped_and_short_block_list_fails_closed(engine, make_kv):
    register(engine, make_kv())
    assert engine.transfers.store(key(TOKENS, 0, 2 * C), 11, [[0, 0, 3, 4]], b"") == StoreResult(
        1, 0
    )
    assert engine.l1.stats().objects == 1
    with pytest.raises(TransferFailed, match="block ids"):
        engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [[1, 2, 3]], b"")


def test_unknown_instance_soft_failure(engine, make_kv):
    with pytest.raises(TransferFailed, match="unknown instance"):
        engine.transfers.store(key(TOKENS, 0, C), 99, [[1, 2]], b"")
    with pytest.raises(TransferFailed, match="unknown instance"):
        engine.transfers.retrieve(key(TOKENS, 0, C), 99, [[1, 2]], b"", 0)
    assert engine.counters["retrieve_failures"] == 1


def test_free_lookup_locks_and_end_session_release(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [BLOCKS_A], b"")
    assert lookup_hits(engine, TOKENS, readers=2) == 4
    assert engine.l1.stats().read_locked_objects == 4
    engine.lookups.free_lookup_locks(key(TOKENS, 0, 2 * C, rid="q", worker=None, readers=2), 1)
    assert engine.l1.stats().read_locked_objects == 2
    engine.lookups.end_session("q")
    assert engine.l1.stats().read_locked_objects == 0


def test_second_lookup_releases_unconsumed_first(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [BLOCKS_A], b"")
    engine.lookups.lookup(key(TOKENS, 0, 4 * C, rid="q", worker=None), 1)
    engine.lookups.lookup(key(TOKENS, 0, 4 * C, rid="q", worker=None), 1)
    assert engine.lookups.query_prefetch_status("q") == 4
    hashes = engine.sessions.get("q").hashes
    keys = [ObjectKey(h, "m", pack_kv_rank(1, 0)) for h in hashes]
    # Only the second lookup's single lock per object is left.
    assert engine.l1.unlock(keys, LookupOwner("q", "m", pack_kv_rank(1, 0)), 5) == 4


def test_unregister_releases_locks_and_unmaps(engine, make_kv):
    kv = make_kv()
    register(engine, kv)
    engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [BLOCKS_A], b"")
    lookup_hits(engine, TOKENS)
    mapping = engine.registry.get(11).mapping
    engine.transfers.unregister_kv_cache(11)
    assert mapping.closed
    assert engine.l1.stats().read_locked_objects == 0
    assert engine.status()["registered_instances"] == {}


def test_reaper_drops_silent_instance(engine, make_kv, clock):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [BLOCKS_A], b"")
    lookup_hits(engine, TOKENS)
    engine.ping(11)
    clock.now += 121
    assert [i.instance_id for i in engine.registry.reap()] == [11]
    assert engine.l1.stats().read_locked_objects == 0


def test_reregistration_replaces_mapping(engine, make_kv):
    old, new, dst = make_kv(), make_kv(), make_kv()
    register(engine, old, 5)
    register(engine, new, 5)  # same id, new memory: must not keep the stale mapping
    register(engine, dst, 6)
    engine.transfers.store(key(TOKENS, 0, 4 * C), 5, [BLOCKS_A], b"")
    lookup_hits(engine, TOKENS)
    engine.transfers.retrieve(key(TOKENS, 0, 4 * C, rid="q"), 6, [BLOCKS_B], b"", 0)
    np.testing.assert_array_equal(dst.token_rows(BLOCKS_B), new.token_rows(BLOCKS_A))
    assert not np.array_equal(dst.token_rows(BLOCKS_B), old.token_rows(BLOCKS_A))


def test_rewritten_token_list_rehashes(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 2 * C, rid="w"), 11, [BLOCKS_A[:4]], b"")
    rewritten = [5] * (2 * C) + TOKENS[2 * C :]
    engine.transfers.store(key(rewritten, 2 * C, 4 * C, rid="w"), 11, [BLOCKS_A[4:]], b"")
    # Chunks 2-3 were keyed under the rewritten prefix, so the original prompt hits 2 only.
    assert lookup_hits(engine, TOKENS, rid="a") == 2
    assert lookup_hits(engine, rewritten, rid="b") == 0  # its chunks 0-1 were never stored


def test_bad_lookup_reports_zero(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [BLOCKS_A], b"")
    assert lookup_hits(engine, TOKENS, readers=0) == 0
    assert lookup_hits(engine, [2**40, *TOKENS[1:]], rid="big") == 0
    assert engine.lookups.wait_prefetch_status("unknown", 0.01) == 0


class ManualPrefetcher:
    """Stand-in for the L2 prefetch controller that completes when the test says so,
    to exercise the asynchronous job states (running, finished, orphaned)."""

    def __init__(self):
        self.calls = []

    def prefetch(self, rows, owner_of, num_readers, done):
        self.calls.append((rows, owner_of, num_readers, done))


def test_lookup_with_running_prefetch(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 2 * C), 11, [BLOCKS_A[:4]], b"")
    engine.lookups.prefetcher = pf = ManualPrefetcher()
    engine.lookups.lookup(key(TOKENS, 0, 4 * C, rid="q", worker=None), 1)
    rows, owner_of, readers, done = pf.calls[0]
    assert len(rows) == 2 and readers == 1  # chunks 2 and 3 are below L1
    assert owner_of(rows[0][0]) == LookupOwner("q", "m", pack_kv_rank(1, 0))
    assert engine.lookups.query_prefetch_status("q") is None  # still running
    assert engine.lookups.wait_prefetch_status("q", 0.01) is None
    done(1)
    assert engine.lookups.query_prefetch_status("q") == 3
    assert engine.lookups.query_prefetch_status("q") == 0


def test_replaced_running_lookup_frees_its_locks_when_done(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 2 * C), 11, [BLOCKS_A[:4]], b"")
    engine.lookups.prefetcher = pf = ManualPrefetcher()
    engine.lookups.lookup(key(TOKENS, 0, 4 * C, rid="q", worker=None), 1)
    engine.lookups.prefetcher = None
    engine.lookups.lookup(key(TOKENS, 0, 4 * C, rid="q", worker=None), 1)
    assert engine.lookups.query_prefetch_status("q") == 2
    pf.calls[0][3](0)  # the first job finishes late: its two locks go
    keys = [ObjectKey(h, "m", pack_kv_rank(1, 0)) for h in engine.sessions.get("q").hashes[:2]]
    assert engine.l1.unlock(keys, LookupOwner("q", "m", pack_kv_rank(1, 0)), 5) == 2


def test_started_lookup_is_visible_before_it_runs_and_waiters_wake(engine, make_kv):
    register(engine, make_kv())
    engine.transfers.store(key(TOKENS, 0, 4 * C), 11, [BLOCKS_A], b"")
    ack = engine.lookups.start_lookup(key(TOKENS, 0, 4 * C, rid="w", worker=None), 1)
    assert ack.value is None  # the acknowledgement carries nothing
    assert engine.lookups.query_prefetch_status("w") is None  # published, not run yet
    got = []
    waiter = threading.Thread(
        target=lambda: got.append(engine.lookups.wait_prefetch_status("w", 5))
    )
    waiter.start()
    ack.then()
    waiter.join(5)
    assert got == [4]
    assert engine.lookups.query_prefetch_status("w") == 0  # reported once


def test_lookup_that_raises_after_the_ack_reports_zero(engine, make_kv, monkeypatch):
    register(engine, make_kv())
    ack = engine.lookups.start_lookup(key(TOKENS, 0, 4 * C, rid="x", worker=None), 1)

    def boom(*a):
        raise RuntimeError("lock table broke")

    monkeypatch.setattr(engine.l1, "lock_prefix", boom)
    with pytest.raises(RuntimeError):
        ack.then()
    assert engine.lookups.query_prefetch_status("x") == 0  # never left polling forever
