"""Forced removal of memory still in use: DOOMED objects and reservations (issue 10, fault 3).

A forced clear or delete may drop data, but it never frees memory a copy (a read lock) or a
writer (a live reservation) still uses: such objects vanish at once for lookups, locks and
commits, and their bytes return when the last reader or the writer is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvhive.keys import ObjectKey
from kvhive.storage.l1 import L1Manager
from kvhive.storage.owners import CopyPin, LookupOwner, WorkerCopyPin, WriterOwner

UNIT = 4096
UNITS = 64  # the conftest L1: 64 units
MakeL1 = Callable[..., L1Manager]
MakeKeys = Callable[..., list[ObjectKey]]
W = WriterOwner(1)
PIN = CopyPin(7)


def store(l1: L1Manager, ks: list[ObjectKey], fill: int) -> None:
    slots = l1.reserve(ks, UNIT, W)
    assert all(slots)
    for slot in slots:
        assert slot is not None
        l1.view(slot)[:] = fill
    assert all(l1.commit([s for s in slots if s]))


def fill_arena(l1: L1Manager, keys: MakeKeys, fill: int, start: int = 1000) -> int:
    """Reserve, overwrite and commit as many new objects as L1 still grants; returns how many."""
    slots = [s for s in l1.reserve(keys(UNITS, start=start), UNIT, WriterOwner(2)) if s]
    for slot in slots:
        l1.view(slot)[:] = fill
    assert all(l1.commit(slots))
    return len(slots)


def accounting(l1: L1Manager) -> tuple[int, int, int, bool]:
    st = l1.stats()
    return st.objects, st.doomed_objects, st.used_bytes, st.healthy


def test_pinned_view_survives_a_forced_clear_and_new_allocations(
    make_l1: MakeL1, keys: MakeKeys
) -> None:
    l1 = make_l1()
    ks = keys(2)
    store(l1, ks, fill=0x5A)
    (slot,) = l1.read_lock(ks[:1], PIN)  # a retrieve's copy pin
    assert slot is not None
    view = l1.view(slot)
    assert l1.clear(force=True) == 2
    # Gone for every new reader at once, though its bytes are still in use.
    assert l1.contains(ks) == [False, False]
    assert l1.read_lock(ks, LookupOwner("r", "model", 0)) == [None, None]
    assert l1.lock_prefix([[ks[0]]], 1, LookupOwner("r", "model", 0)) == 0
    assert accounting(l1) == (0, 1, UNIT, True)
    # Everything else is reusable: the arena fills up, except the pinned unit.
    assert fill_arena(l1, keys, fill=0xFF) == UNITS - 1
    assert (view == 0x5A).all()
    assert l1.unlock(ks[:1], PIN) == 1  # the copy ends: now the memory returns
    assert accounting(l1) == (UNITS - 1, 0, (UNITS - 1) * UNIT, True)
    (last,) = l1.reserve(keys(1, start=5000), UNIT, W)  # the one free unit left
    assert last is not None and last.offset == slot.offset


def test_forced_delete_of_a_locked_object_is_doomed_until_unlocked(
    make_l1: MakeL1, keys: MakeKeys
) -> None:
    l1 = make_l1()
    ks = keys(3)
    store(l1, ks, fill=1)
    pin = WorkerCopyPin(3)
    l1.read_lock(ks[:2], pin, count=2)
    assert l1.delete(ks, force=True) == 3
    assert accounting(l1) == (0, 2, 2 * UNIT, True)
    l1.unlock(ks[:2], pin)  # one of two locks each: still read
    assert l1.stats().doomed_objects == 2
    l1.unlock(ks[:1], pin)
    assert accounting(l1) == (0, 1, UNIT, True)
    assert l1.release_owners(lambda o: o == pin) == (1, 0)  # unregister / reaping
    assert accounting(l1) == (0, 0, 0, True)


def test_a_doomed_reservation_cannot_commit_and_is_never_handed_out(
    make_l1: MakeL1, keys: MakeKeys
) -> None:
    l1 = make_l1()
    ks = keys(2)
    slots = l1.reserve(ks, UNIT, W)
    assert l1.clear(force=True) == 2
    assert l1.stats().doomed_objects == 2 and l1.stats().staging_objects == 0
    assert fill_arena(l1, keys, fill=0xFF) == UNITS - 2  # the writer's buffers stay its own
    for slot in slots:
        assert slot is not None
        l1.view(slot)[:] = 0x11  # the writer is still copying
    assert l1.commit([slots[0]]) == [False]  # a doomed reservation never becomes visible
    assert l1.contains(ks) == [False, False]
    assert l1.abort([slots[1]]) == 1
    assert accounting(l1) == (UNITS - 2, 0, (UNITS - 2) * UNIT, True)


def test_a_key_can_be_stored_again_while_its_old_object_is_still_read(
    make_l1: MakeL1, keys: MakeKeys
) -> None:
    l1 = make_l1()
    (k,) = keys(1)
    store(l1, [k], fill=1)
    (old,) = l1.read_lock([k], PIN)
    assert old is not None
    l1.delete([k], force=True)
    store(l1, [k], fill=2)  # a new object under the same key
    reader = LookupOwner("r2", "model", 0)
    (new,) = l1.read_lock([k], reader)
    assert new is not None and new.offset != old.offset
    assert (l1.view(old) == 1).all() and (l1.view(new) == 2).all()
    assert accounting(l1) == (1, 1, 2 * UNIT, True)
    l1.unlock([k], PIN)  # the key is still locked (by the new object's reader): kept
    assert accounting(l1) == (1, 1, 2 * UNIT, True)
    l1.unlock([k], reader)
    assert accounting(l1) == (1, 0, UNIT, True)
    assert (l1.view(new) == 2).all()


def test_doomed_memory_whose_locks_expired_is_reclaimed(
    make_l1: MakeL1, keys: MakeKeys, clock: Any
) -> None:
    l1 = make_l1(read_ttl=5.0, write_ttl=5.0)
    ks = keys(2)
    store(l1, ks[:1], fill=1)
    l1.read_lock(ks[:1], PIN)
    l1.reserve(ks[1:], UNIT, W)
    l1.clear(force=True)
    assert accounting(l1) == (0, 2, 2 * UNIT, True)
    clock.advance(5.0)  # the pin and the reservation outlived their TTLs
    l1.evict_tick()
    assert accounting(l1) == (0, 0, 0, True)
    assert l1.stats().expired_reservations == 1


def test_forced_clear_of_unlocked_and_expired_frees_at_once(
    make_l1: MakeL1, keys: MakeKeys, clock: Any
) -> None:
    l1 = make_l1(write_ttl=5.0)
    ks = keys(3)
    store(l1, ks[:2], fill=1)
    l1.reserve(ks[2:], UNIT, W)
    clock.advance(5.0)
    assert l1.clear(force=True) == 3
    assert accounting(l1) == (0, 0, 0, True)
    assert fill_arena(l1, keys, fill=3) == UNITS  # nothing pinned: every unit is free


def test_lookup_locks_alone_do_not_keep_forced_memory(make_l1: MakeL1, keys: MakeKeys) -> None:
    """A lookup's locks only promise a later retrieve (which then misses, a soft failure); a
    forced clear frees their objects at once, so repeated clears racing lookups cannot fill L1
    with doomed memory until the read TTL.  A running copy's pin still keeps its object."""
    l1 = make_l1()
    ks = keys(3)
    store(l1, ks, fill=0x11)
    lookup = LookupOwner("req", "model", 0)
    assert l1.lock_prefix([[k] for k in ks], 2, lookup) == 3
    (pinned,) = l1.read_lock(ks[2:], PIN)
    assert pinned is not None
    assert l1.clear(force=True) == 3
    objects, doomed, used, healthy = accounting(l1)
    assert (objects, doomed, used, healthy) == (0, 1, UNIT, True)  # only the pinned one
    assert l1.unlock(ks[:2], lookup, 2) == 0  # the lookup's locks went with the objects
    assert fill_arena(l1, keys, fill=0x22) == UNITS - 1
    assert bytes(l1.view(pinned)[:4]) == b"\x11" * 4
    l1.unlock(ks[2:], PIN)
    assert accounting(l1)[1:3] == (0, (UNITS - 1) * UNIT)
