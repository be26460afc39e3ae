"""TTLLockTable: counted holds, per-owner deadlines, owner release."""

from __future__ import annotations

import pytest

from kvhive.storage.locks import TTLLockTable
from kvhive.storage.owners import LookupOwner, WriterOwner

A, OLD, NEW = WriterOwner(1), WriterOwner(2), WriterOwner(3)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clk() -> Clock:
    return Clock()


def test_counts_add_up_and_release_is_bounded(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["k"], A, count=2)
    t.acquire(["k"], A)
    assert t.live_count("k") == 3
    assert t.release("k", A, 2) == 2
    assert t.release("k", A, 5) == 1
    assert not t.is_locked("k")
    assert t.release("k", A) == 0
    assert t.release("k", "nobody") == 0


def test_each_owner_has_its_own_deadline(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["k"], OLD)
    clk.now = 4.0
    t.acquire(["k"], NEW)  # does not extend "old"
    clk.now = 6.0
    assert t.is_locked("k")
    assert t.live_count("k") == 1
    assert t.release("k", OLD) == 0  # expired: nothing to give back
    clk.now = 9.0
    assert not t.is_locked("k")
    assert t.locked_keys() == 0


def test_reacquire_after_expiry_restarts_the_count(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["k"], A, count=3)
    clk.now = 5.0  # deadline reached: expired
    t.acquire(["k"], A)
    assert t.live_count("k") == 1


def test_release_owners_drops_everything_of_matching_owners(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["x", "y"], LookupOwner("r1", "m", 0), count=2)
    t.acquire(["x"], LookupOwner("r2", "m", 0))
    t.acquire(["z"], WriterOwner(7))
    released = t.release_owners(lambda o: isinstance(o, LookupOwner))
    assert released == 5
    assert (t.is_locked("x"), t.is_locked("y"), t.is_locked("z")) == (False, False, True)
    clk.now = 10.0
    assert t.release_owners(lambda o: True) == 0  # expired holds count as released already
    assert t.locked_keys() == 0


def test_drop_and_bad_count(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["k"], WriterOwner(1))
    t.drop("k")
    assert not t.is_locked("k")
    assert t.release_owners(lambda o: True) == 0
    with pytest.raises(ValueError):
        t.acquire(["k"], WriterOwner(1), count=0)
    with pytest.raises(ValueError):
        TTLLockTable(0.0, clk)


def test_release_many_is_release_per_key(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["a", "b", "c"], A, count=2)
    t.acquire(["b"], NEW)
    assert t.release_many(["a", "b", "x"], A, 1) == 2  # "x": not held, nothing
    assert [t.live_count(k) for k in "abc"] == [1, 2, 2]
    assert t.release_many(["a", "b", "c"], A, 5) == 4
    assert [t.is_locked(k) for k in "abc"] == [False, True, False]
    assert t.release_many(["a"], OLD) == 0  # an owner holding nothing
    clk.now = 6.0
    assert t.release_many(["b"], NEW) == 0  # expired: nothing to give back


def test_owner_records_go_with_their_last_hold(clk: Clock) -> None:
    """The owner index holds exactly the owners holding something, whichever way their
    holds end (release, expiry pruning, drop, drop_holds, release_owners)."""
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    lookup = LookupOwner("r", "m", 1)
    t.acquire([], A)  # nothing to hold: no record
    assert t._holders == {}
    t.acquire(["a", "b"], A)
    t.acquire(iter(["b", "c"]), lookup)  # any iterable
    assert set(t._holders) == {A, lookup}
    t.release("a", A)
    t.drop("b")
    assert set(t._holders) == {lookup}  # A held only a and b
    assert t.drop_holds("c", lambda o: o == lookup) == 1
    assert t._holders == {} and t._by_key == {}
    t.acquire(["a"], A)
    clk.now = 9.0
    assert not t.is_locked("a")  # pruned
    assert t._holders == {} and t._by_key == {}
    t.acquire(["a", "b"], A, count=3)
    t.acquire(["b"], lookup)
    assert t.release_owners(lambda o: o == A) == 6
    assert set(t._holders) == {lookup} and list(t._by_key) == ["b"]
