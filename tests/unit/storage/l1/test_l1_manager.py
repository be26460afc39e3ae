"""L1Manager: reservations, commits, read locks, owners, deletion, lifecycle."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvhive.keys import ObjectKey
from kvhive.storage.l1 import L1Manager, L1Params
from kvhive.storage.l1.arena import Arena
from kvhive.storage.owners import CopyPin, LookupOwner, WriterOwner

UNIT = 4096
MakeL1 = Callable[..., L1Manager]
MakeKeys = Callable[..., list[ObjectKey]]
W = WriterOwner(1)  # a writer
R = LookupOwner("r1", "m", 0)  # a reader
PIN = CopyPin(7)  # a copy reading an object


def store(l1: L1Manager, ks: list[ObjectKey], nbytes: int = UNIT) -> None:
    slots = l1.reserve(ks, nbytes, W)
    assert all(slots)
    assert all(l1.commit([s for s in slots if s]))


def test_reserve_view_commit(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    ks = keys(2)
    slots = l1.reserve(ks, 3000, W)
    assert all(s is not None for s in slots)
    assert l1.contains(ks) == [False, False]  # staging is invisible to readers
    assert l1.read_lock(ks, R) == [None, None]
    for i, slot in enumerate(slots):
        assert slot is not None
        view = l1.view(slot)
        assert view.size == 3000 and view.dtype == np.uint8
        view[:] = i + 1
    st = l1.stats()
    assert (st.staging_objects, st.staging_bytes, st.used_bytes) == (2, 2 * UNIT, 2 * UNIT)
    assert l1.commit([s for s in slots if s]) == [True, True]
    assert l1.contains(ks) == [True, True]
    got = l1.resident(ks)
    assert [int(l1.view(s)[0]) for s in got if s] == [1, 2]
    st = l1.stats()
    assert (st.objects, st.staging_objects, st.used_bytes, st.healthy) == (2, 0, 2 * UNIT, True)


def test_reserve_refuses_resident_staged_and_duplicate_keys(
    make_l1: MakeL1, keys: MakeKeys
) -> None:
    l1 = make_l1()
    ks = keys(3)
    store(l1, ks[:1])
    assert l1.reserve([ks[1]], UNIT, WriterOwner(2))[0] is not None
    got = l1.reserve([ks[0], ks[1], ks[2], ks[2]], UNIT, W)
    assert [s is not None for s in got] == [False, False, True, False]
    with pytest.raises(ValueError):
        l1.reserve(ks, 0, W)


def test_commit_after_write_ttl_fails_and_frees(
    make_l1: MakeL1, keys: MakeKeys, clock: Any
) -> None:
    l1 = make_l1(write_ttl=10.0)
    slots = l1.reserve(keys(2), UNIT, W)
    clock.advance(10.0)
    assert l1.commit([s for s in slots if s]) == [False, False]
    st = l1.stats()
    assert (st.objects, st.used_bytes, st.expired_reservations) == (0, 0, 2)


def test_expired_reservation_is_handed_over(make_l1: MakeL1, keys: MakeKeys, clock: Any) -> None:
    l1 = make_l1(write_ttl=10.0)
    k = keys(1)
    (old,) = l1.reserve(k, UNIT, W)
    assert l1.reserve(k, UNIT, WriterOwner(2)) == [None]  # live: refused
    clock.advance(11.0)
    (new,) = l1.reserve(k, UNIT, WriterOwner(2))
    assert old is not None and new is not None
    assert new.offset == old.offset  # same size: the buffer changes hands
    assert l1.commit([old]) == [False]  # the dead writer cannot commit it any more
    assert l1.commit([new]) == [True]
    assert l1.stats().expired_reservations == 1


def test_expired_reservation_of_another_size_is_reallocated(
    make_l1: MakeL1, keys: MakeKeys, clock: Any
) -> None:
    l1 = make_l1(write_ttl=10.0)
    k = keys(1)
    l1.reserve(k, UNIT, W)
    clock.advance(11.0)
    (new,) = l1.reserve(k, 2 * UNIT, W)
    assert new is not None
    assert l1.stats().used_bytes == 2 * UNIT


def test_abort_frees(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    slots = [s for s in l1.reserve(keys(3), UNIT, W) if s]
    assert l1.abort(slots[:2]) == 2
    assert l1.abort(slots[:2]) == 0
    assert l1.stats().used_bytes == UNIT


def rows_of(ks: list[ObjectKey], width: int) -> list[list[ObjectKey]]:
    return [ks[i : i + width] for i in range(0, len(ks), width)]


def test_lock_prefix_full_partial_zero(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    rank0, rank1 = keys(4), keys(4, rank=1)
    rows = [[a, b] for a, b in zip(rank0, rank1, strict=True)]
    assert l1.lock_prefix(rows, 1, R) == 0
    store(l1, rank0[:3] + rank1[:2])
    assert l1.lock_prefix(rows, 2, R) == 2  # chunk 2 lacks its rank-1 object
    assert l1.stats().read_locked_objects == 4
    store(l1, rank0[3:] + rank1[2:])
    assert l1.lock_prefix(rows, 1, LookupOwner("r2", "m", 0)) == 4
    assert l1.stats().read_locked_objects == 8


def test_lock_prefix_stops_at_a_hole(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    ks = keys(5)
    store(l1, ks)
    l1.delete([ks[2]])
    assert l1.lock_prefix(rows_of(ks, 1), 1, R) == 2
    assert l1.delete(ks[3:]) == 2  # keys after the prefix were not locked
    assert l1.delete(ks[:2]) == 0


def test_lock_prefix_touches_for_recency(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    old, new = keys(2), keys(2, start=10)
    store(l1, old)
    store(l1, new)
    l1.lock_prefix(rows_of(old, 1), 1, R)
    l1.unlock(old, R)
    assert list(l1.policy.victims(lambda k: True)) == [new[1], new[0], old[1], old[0]]


def test_unlock_counts(make_l1: MakeL1, keys: MakeKeys, clock: Any) -> None:
    l1 = make_l1(read_ttl=5.0)
    ks = keys(3)
    store(l1, ks)
    assert l1.lock_prefix(rows_of(ks, 1), 2, R) == 3
    assert l1.unlock(ks, R) == 3
    assert l1.unlock(ks[:1], LookupOwner("other", "m", 0)) == 0
    assert l1.unlock(ks, R, count=5) == 3
    assert l1.unlock(ks, R) == 0
    l1.read_lock(ks, R, count=2)
    clock.advance(5.0)
    assert l1.unlock(ks, R) == 0  # expired locks are already gone
    assert l1.stats().read_locked_objects == 0


def test_read_lock_and_resident(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    ks = keys(2)
    store(l1, ks[:1])
    locked = l1.read_lock(ks, R)
    assert locked[0] is not None and locked[1] is None
    assert l1.resident(ks)[0] is locked[0]
    assert l1.delete(ks) == 0  # locked
    assert l1.stats().read_locked_objects == 1


def test_release_owners_frees_a_dead_client_at_once(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    ks = keys(4)
    store(l1, ks[:2])
    l1.lock_prefix(rows_of(ks[:2], 1), 3, LookupOwner("r9", "m", 0))
    l1.read_lock(ks[:1], LookupOwner("r9", "m", 1))
    l1.read_lock(ks[:1], LookupOwner("alive", "m", 0))
    l1.reserve(ks[2:], UNIT, WriterOwner(9))
    dead = {"r9"}

    def owned_by_dead(o: object) -> bool:
        return (isinstance(o, LookupOwner) and o.request_id in dead) or o == WriterOwner(9)

    assert l1.release_owners(owned_by_dead) == (7, 2)
    st = l1.stats()
    assert (st.staging_objects, st.used_bytes, st.read_locked_objects) == (0, 2 * UNIT, 1)
    assert l1.delete(ks[:2]) == 1  # only the live client's lock remains


def test_delete_respects_locks_and_live_reservations(
    make_l1: MakeL1, keys: MakeKeys, clock: Any
) -> None:
    l1 = make_l1(write_ttl=10.0)
    ks = keys(4)
    store(l1, ks[:2])
    l1.read_lock(ks[:1], PIN)  # a running copy
    l1.reserve(ks[2:3], UNIT, W)
    assert l1.delete(ks[:3]) == 1  # the unlocked resident object only
    assert l1.delete(ks[:3], force=True) == 2
    st = l1.stats()  # still read or written: invisible, memory kept (test_l1_doomed.py)
    assert (st.objects, st.doomed_objects, st.used_bytes) == (0, 2, 2 * UNIT)
    l1.unlock(ks[:1], PIN)
    l1.reserve(ks[3:], UNIT, W)
    clock.advance(10.0)
    assert l1.delete(ks[3:]) == 1  # expired reservation
    l1.evict_tick()  # the doomed reservation's write TTL is over too
    st = l1.stats()
    assert (st.objects, st.used_bytes, st.read_locked_objects, st.healthy) == (0, 0, 0, True)


def test_clear_with_and_without_force(make_l1: MakeL1, keys: MakeKeys, clock: Any) -> None:
    l1 = make_l1(write_ttl=10.0)
    ks = keys(6)
    store(l1, ks[:3])
    l1.read_lock(ks[:1], PIN)  # a running copy
    l1.reserve(ks[3:4], UNIT, W)
    clock.advance(11.0)
    l1.reserve(ks[4:5], UNIT, W)  # live
    assert l1.clear() == 3  # two unlocked objects and one expired reservation
    st = l1.stats()
    assert (st.objects, st.staging_objects) == (1, 1)
    assert l1.clear(force=True) == 2
    st = l1.stats()  # the locked object and the live reservation are doomed, not freed
    assert (st.objects, st.staging_objects, st.doomed_objects) == (0, 0, 2)
    assert (st.used_bytes, st.healthy) == (2 * UNIT, True)
    l1.unlock(ks[:1], PIN)
    clock.advance(10.0)
    l1.evict_tick()
    st = l1.stats()
    assert (st.objects, st.staging_objects, st.used_bytes, st.healthy) == (0, 0, 0, True)


def test_touch_and_contains(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    ks = keys(3)
    store(l1, ks)
    l1.touch([ks[2], keys(1, start=99)[0]])
    assert list(l1.policy.victims(lambda k: True)) == [ks[1], ks[0], ks[2]]
    assert l1.contains([ks[0], keys(1, start=99)[0]]) == [True, False]


def test_listeners_run_outside_the_mutex_in_order(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    seen: list[tuple[str, list[ObjectKey], bool]] = []

    def listener(event: str, ks: list[ObjectKey]) -> None:
        seen.append((event, ks, l1._mu.locked()))

    def broken(_event: str, _ks: list[ObjectKey]) -> None:
        raise RuntimeError("listener bug")

    l1.add_listener(broken)
    l1.add_listener(listener)
    ks = keys(2)
    store(l1, ks)
    l1.delete(ks[:1])
    assert seen == [("committed", ks, False), ("removed", ks[:1], False)]
    # the broken listener failed on both events: counted, and the later listener still ran
    assert l1.stats().listener_failures == 2
    assert l1.stats().to_dict()["listener_failures"] == 2


def test_stats_dict_and_close(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1()
    ks = keys(1)
    store(l1, ks)
    (slot,) = l1.resident(ks)
    d = l1.stats().to_dict()
    assert d["objects"] == 1 and d["configured_bytes"] == 64 * UNIT and d["usage"] == 1 / 64
    assert d["healthy"] is True and d["listener_failures"] == 0
    l1.close()
    l1.close()
    assert slot is not None
    with pytest.raises(RuntimeError):
        l1.view(slot)
    with pytest.raises(RuntimeError):
        l1.reserve(keys(1, start=5), UNIT, W)
    assert l1.stats().healthy is False


def test_bad_arguments(make_l1: MakeL1, keys: MakeKeys) -> None:
    for bad in (
        {"watermark": 0.0},
        {"eviction_ratio": 1.5},
        {"read_ttl": 0.0},
        {"write_ttl": -1.0},
        {"size_bytes": 0},
        {"evict_interval": 0.0},
    ):
        with pytest.raises(ValueError):
            make_l1(**bad)
    with Arena(32 * UNIT, align=UNIT) as small, pytest.raises(ValueError):
        make_l1(arena=small)
    l1 = make_l1()
    with pytest.raises(ValueError):
        l1.lock_prefix([keys(1)], 0, R)


def test_shared_memory_l1(make_l1: MakeL1, keys: MakeKeys) -> None:
    l1 = make_l1(shm_name=f"kvhive-l1-test-{os.getpid()}")
    name = l1.arena.shm_segment_name
    assert os.path.exists(f"/dev/shm/{name}")
    store(l1, keys(2))
    l1.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_params_are_a_frozen_record_with_every_field_required() -> None:
    fields = {
        "size_bytes": 64 * UNIT, "align_bytes": UNIT, "lazy": False, "init_bytes": 0,
        "write_ttl": 600.0, "read_ttl": 300.0, "watermark": 0.8, "eviction_ratio": 0.2,
        "shm_name": "",
    }  # fmt: skip
    params = L1Params(**fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.watermark = 0.5  # type: ignore[misc]
    assert not hasattr(params, "__dict__")  # slotted
    for name in fields:  # no restated flag defaults
        with pytest.raises(TypeError):
            L1Params(**{k: v for k, v in fields.items() if k != name})
