"""TTLLockTable: counted holds, per-owner deadlines, owner release."""

from __future__ import annotations

import pytest

from kvhive.storage.locks import TTLLockTable


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
    t.acquire(["k"], "a", count=2)
    t.acquire(["k"], "a")
    assert t.live_count("k") == 3
    assert t.release("k", "a", 2) == 2
    assert t.release("k", "a", 5) == 1
    assert not t.is_locked("k")
    assert t.release("k", "a") == 0
    assert t.release("k", "nobody") == 0


def test_each_owner_has_its_own_deadline(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["k"], "old")
    clk.now = 4.0
    t.acquire(["k"], "new")  # does not extend "old"
    clk.now = 6.0
    assert t.is_locked("k")
    assert t.live_count("k") == 1
    assert t.release("k", "old") == 0  # expired: nothing to give back
    clk.now = 9.0
    assert not t.is_locked("k")
    assert t.locked_keys() == 0


def test_reacquire_after_expiry_restarts_the_count(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["k"], "a", count=3)
    clk.now = 5.0  # deadline reached: expired
    t.acquire(["k"], "a")
    assert t.live_count("k") == 1


def test_release_owners_drops_everything_of_matching_owners(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["x", "y"], ("req", "r1", 0), count=2)
    t.acquire(["x"], ("req", "r2", 0))
    t.acquire(["z"], ("inst", 7))
    released = t.release_owners(lambda o: o[0] == "req")
    assert released == 5
    assert (t.is_locked("x"), t.is_locked("y"), t.is_locked("z")) == (False, False, True)
    clk.now = 10.0
    assert t.release_owners(lambda o: True) == 0  # expired holds count as released already
    assert t.locked_keys() == 0


def test_drop_and_bad_count(clk: Clock) -> None:
    t: TTLLockTable[str] = TTLLockTable(5.0, clk)
    t.acquire(["k"], "a")
    t.drop("k")
    assert not t.is_locked("k")
    assert t.release_owners(lambda o: True) == 0
    with pytest.raises(ValueError):
        t.acquire(["k"], "a", count=0)
    with pytest.raises(ValueError):
        TTLLockTable(0.0, clk)
