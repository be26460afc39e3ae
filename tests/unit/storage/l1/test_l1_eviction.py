"""L1Manager memory pressure: inline eviction, ticks, quotas, lazy growth, threads."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvhive.keys import ObjectKey
from kvhive.storage.eviction.lru import LRUPolicy
from kvhive.storage.l1.arena import Arena
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.owners import LookupOwner, WriterOwner
from kvhive.storage.quota import QuotaRegistry

UNIT = 4096
MakeL1 = Callable[..., L1Manager]
MakeKeys = Callable[..., list[ObjectKey]]
W = WriterOwner(1)
R = LookupOwner("r1", "m", 0)


def store(l1: L1Manager, ks: list[ObjectKey], batch: int = 8) -> None:
    """Store ``ks`` as requests of ``batch`` chunks each (the batch order matters to LRU)."""
    for i in range(0, len(ks), batch):
        slots = l1.reserve(ks[i : i + batch], UNIT, W)
        assert all(slots)
        assert all(l1.commit([s for s in slots if s]))


def rows(ks: list[ObjectKey]) -> list[list[ObjectKey]]:
    return [[k] for k in ks]


def wait_for(cond: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll a condition driven by a background thread (no timing asserts, just a cap)."""
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_inline_eviction_makes_room_tail_chunks_first(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    ks = keys(64)
    store(l1, ks)
    fresh = keys(10, start=100)
    assert all(l1.reserve(fresh, UNIT, W))
    # Oldest request first, and inside a request its tail first: 7..0, then 15, 14.
    gone = set(ks[:8]) | {ks[14], ks[15]}
    assert l1.contains(ks) == [k not in gone for k in ks]
    st = l1.stats()
    assert (st.evicted_objects, st.evicted_bytes, st.dropped_oom) == (10, 10 * UNIT, 0)
    assert st.healthy


def test_partial_allocation_keeps_the_prefix(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    got = l1.reserve(keys(70), UNIT, W)
    assert [s is not None for s in got] == [True] * 64 + [False] * 6
    assert l1.stats().dropped_oom == 6


def test_locked_objects_are_never_evicted_and_drops_are_reported(
    make_l1: MakeL1, keys: MakeKeys, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    l1 = make_l1()
    ks = keys(64)
    store(l1, ks)
    assert l1.lock_prefix(rows(ks[:60]), 1, R) == 60
    with caplog.at_level(logging.WARNING, logger="kvhive.storage.l1.manager"):
        got = l1.reserve(keys(10, start=100), UNIT, W)
        assert [s is not None for s in got] == [True] * 4 + [False] * 6
        assert all(l1.contains(ks[:60]))
        assert l1.reserve(keys(1, start=200), UNIT, W) == [None]
        assert len(caplog.records) == 1  # rate limited
        clock.advance(10.0)
        l1.reserve(keys(1, start=300), UNIT, W)
        assert len(caplog.records) == 2
    assert "dropped 2" in caplog.records[1].getMessage()
    assert l1.stats().dropped_oom == 8
    assert l1.evict_tick() == 0  # everything evictable is already gone


def test_expired_reservations_are_reclaimed_before_evicting(
    make_l1: MakeL1, keys: MakeKeys, clock: Any
) -> None:
    l1 = make_l1(write_ttl=10.0)
    store(l1, keys(60))
    l1.reserve(keys(4, start=100), UNIT, WriterOwner(2))  # a writer that dies
    clock.advance(10.0)
    assert all(l1.reserve(keys(4, start=200), UNIT, W))
    st = l1.stats()
    assert (st.evicted_objects, st.expired_reservations, st.staging_objects) == (0, 4, 4)


def test_tick_evicts_ratio_of_used_bytes_above_watermark(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    store(l1, keys(51), batch=51)
    assert l1.evict_tick() == 0  # 51/64 < 0.8
    store(l1, keys(9, start=51), batch=9)
    assert l1.usage == 60 / 64
    assert l1.evict_tick() == 12  # 0.2 * 60 units of bytes
    assert l1.usage == 48 / 64
    assert l1.evict_tick() == 0


def test_tick_skips_locked_and_reclaims_expired(
    make_l1: MakeL1, keys: MakeKeys, clock: Any
) -> None:
    l1 = make_l1(write_ttl=10.0, eviction_ratio=1.0)
    ks = keys(56)
    store(l1, ks)
    l1.read_lock(ks[:8], R)
    l1.reserve(keys(2, start=100), UNIT, W)
    clock.advance(10.0)
    assert l1.evict_tick() == 48
    st = l1.stats()
    assert (st.objects, st.staging_objects, st.expired_reservations) == (8, 0, 2)


def test_lazy_arena_grows_before_evicting(make_l1: MakeL1, keys: MakeKeys) -> None:
    arena = Arena(
        64 * UNIT,
        align=UNIT,
        lazy=True,
        init_bytes=16 * UNIT,
        granule_bytes=16 * UNIT,
        grow_step_bytes=16 * UNIT,
    )
    l1 = make_l1(arena=arena, lazy=True)
    assert l1.stats().heap_bytes == 16 * UNIT
    store(l1, keys(40))
    st = l1.stats()
    assert (st.heap_bytes, st.evicted_objects, st.usage) == (48 * UNIT, 0, 40 / 64)
    store(l1, keys(30, start=40), batch=30)
    st = l1.stats()
    assert (st.heap_bytes, st.evicted_objects, st.objects) == (64 * UNIT, 6, 64)


def test_isolated_lru_enforces_whitelist_quotas(make_l1: MakeL1, keys: MakeKeys) -> None:
    quotas = QuotaRegistry()
    quotas.set("a", 8 * UNIT)
    quotas.set("", 1000 * UNIT)
    quotas.set("zero", 0)
    l1 = make_l1(policy_name="IsolatedLRU", quotas=quotas, eviction_ratio=0.5)
    a = keys(8, salt="a")
    b = keys(3, salt="b", start=100)
    free = keys(4, start=200)
    zero = keys(2, salt="zero", start=300)
    for ks in (a, b, free, zero):
        store(l1, ks)
    l1.read_lock(b[:1], R)
    assert l1.evict_tick() == 4 + 2 + 2
    assert l1.contains(a) == [True] * 4 + [False] * 4  # half of "a", its tail first
    assert l1.contains(b) == [True, False, False]  # no quota: all but the locked one
    assert all(l1.contains(free))
    assert not any(l1.contains(zero))
    assert l1.evict_tick() == 0  # "a" is at 4 of 8 units, under 0.8 * limit


def test_isolated_lru_without_registry_keeps_nothing(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1(policy_name="IsolatedLRU")
    store(l1, keys(3, salt="x") + keys(3, start=10))
    assert l1.evict_tick() == 6


def test_isolated_lru_inline_eviction_is_global_lru(make_l1: MakeL1, keys: MakeKeys) -> None:
    quotas = QuotaRegistry()
    for salt in ("a", "b"):
        quotas.set(salt, 1 << 30)
    l1 = make_l1(policy_name="IsolatedLRU", quotas=quotas)
    a, b = keys(32, salt="a"), keys(32, salt="b", start=100)
    store(l1, a, batch=32)
    store(l1, b, batch=32)
    l1.touch(a[:4])  # a[4:] is now the least recent
    assert all(l1.reserve(keys(4, salt="c", start=500), UNIT, W))
    assert l1.contains(a) == [True] * 28 + [False] * 4
    assert all(l1.contains(b))


def test_noop_never_evicts_and_counts_drops(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1(policy_name="noop")
    store(l1, keys(64))
    assert l1.reserve(keys(5, start=100), UNIT, W) == [None] * 5
    assert l1.evict_tick() == 0
    st = l1.stats()
    assert (st.objects, st.dropped_oom, st.evicted_objects) == (64, 5, 0)


def test_evictor_thread_runs_and_stops(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1(evict_interval=0.01)
    store(l1, keys(60))
    l1.start()
    l1.start()  # idempotent
    assert any(t.name == "kvhive-l1-evictor" for t in threading.enumerate())
    assert wait_for(lambda: l1.stats().evicted_objects >= 12)
    l1.close()
    assert not any(t.name == "kvhive-l1-evictor" for t in threading.enumerate())


class BrokenPolicy(LRUPolicy):
    def victims(self, evictable: Callable[[ObjectKey], bool]) -> Iterator[ObjectKey]:
        raise RuntimeError("policy bug")


def test_evictor_survives_a_failing_tick(
    make_l1: MakeL1, keys: MakeKeys, caplog: pytest.LogCaptureFixture
) -> None:
    l1 = make_l1(policy=BrokenPolicy(), evict_interval=0.01)
    store(l1, keys(60))
    with caplog.at_level(logging.CRITICAL, logger="kvhive.storage.l1.manager"):
        l1.start()
        assert wait_for(lambda: l1.stats().evictor_errors >= 2)  # still looping
    l1.close()


def test_threads_smoke(make_l1: MakeL1, keys: MakeKeys) -> None:
    """Writers, readers and a deleter race on a small L1; accounting must stay exact."""
    l1 = make_l1(evict_interval=0.001)
    universe = keys(96)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        rng = random.Random(n)
        owner = LookupOwner(f"t{n}", "m", 0)
        try:
            for _ in range(300):
                start = rng.randrange(0, 88)
                batch = universe[start : start + 8]
                slots = [s for s in l1.reserve(batch, UNIT - 100, WriterOwner(n)) if s]
                for s in slots:
                    l1.view(s)[:4] = n
                if rng.random() < 0.1:
                    l1.abort(slots)
                else:
                    l1.commit(slots)
                hits = l1.lock_prefix(rows(batch), 1, owner)
                l1.unlock(batch[:hits], owner)
                if rng.random() < 0.2:
                    l1.delete(batch[:2])
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread below
            errors.append(exc)

    l1.start()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    st = l1.stats()
    assert st.healthy
    assert (st.staging_objects, st.read_locked_objects) == (0, 0)
    assert st.used_bytes == st.objects * UNIT
