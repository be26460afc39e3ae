"""Eviction policies: LRU batch order, IsolatedLRU buckets, noop, registry."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvhive.keys import ObjectKey
from kvhive.storage.eviction import POLICY_NAMES, make_policy
from kvhive.storage.eviction.isolated_lru import IsolatedLRUPolicy
from kvhive.storage.eviction.lru import LRUPolicy
from kvhive.storage.eviction.noop import NoopPolicy

MakeKeys = Callable[..., list[ObjectKey]]


def every(_key: ObjectKey) -> bool:
    return True


def test_lru_batch_is_applied_back_to_front(keys: MakeKeys) -> None:
    p = LRUPolicy()
    ks = keys(30)
    p.on_created(ks)
    assert list(p.victims(every)) == ks[::-1]  # 29, 28, ..., 0: tail chunks first


def test_lru_touch_and_later_batches_are_more_recent(keys: MakeKeys) -> None:
    p = LRUPolicy()
    first, second = keys(3), keys(3, start=3)
    p.on_created(first)
    p.on_created(second)
    p.on_touched([first[2], keys(1, start=99)[0]])  # untracked keys are ignored
    assert list(p.victims(every)) == [first[1], first[0], second[2], second[1], second[0], first[2]]
    assert len(p) == 6


def test_lru_filter_and_removal(keys: MakeKeys) -> None:
    p = LRUPolicy()
    ks = keys(4)
    p.on_created(ks)
    p.on_removed([ks[3], keys(1, start=50)[0]])
    assert list(p.victims(lambda k: k != ks[2])) == [ks[1], ks[0]]
    assert len(p) == 3


def test_isolated_lru_keeps_one_order_per_salt_and_a_global_one(keys: MakeKeys) -> None:
    p = IsolatedLRUPolicy()
    a, b = keys(3, salt="a"), keys(2, salt="b", start=10)
    p.on_created(a)
    p.on_created(b)
    p.on_touched([a[0]])
    buckets = p.salt_buckets()
    assert {s: list(ks) for s, ks in buckets.items()} == {
        "a": [a[2], a[1], a[0]],
        "b": [b[1], b[0]],
    }
    assert list(p.victims(every)) == [a[2], a[1], b[1], b[0], a[0]]
    assert list(p.victims(lambda k: k.cache_salt == "b")) == [b[1], b[0]]
    assert len(p) == 5


def test_isolated_lru_removes_empty_buckets(keys: MakeKeys) -> None:
    p = IsolatedLRUPolicy()
    a = keys(2, salt="a")
    p.on_created(a)
    p.on_created(a)  # re-creation does not double count
    assert len(p) == 2
    p.on_removed(a)
    assert dict(p.salt_buckets()) == {}
    assert len(p) == 0


def test_noop_tracks_nothing(keys: MakeKeys) -> None:
    p = NoopPolicy()
    p.on_created(keys(5))
    p.on_touched(keys(5))
    p.on_removed(keys(5))
    assert list(p.victims(every)) == []
    assert len(p) == 0
    assert p.salt_buckets() is None


def test_registry() -> None:
    assert set(POLICY_NAMES) == {"LRU", "IsolatedLRU", "noop"}
    assert isinstance(make_policy("LRU"), LRUPolicy)
    assert isinstance(make_policy("IsolatedLRU"), IsolatedLRUPolicy)
    assert isinstance(make_policy("noop"), NoopPolicy)
    assert make_policy("LRU") is not make_policy("LRU")
    with pytest.raises(ValueError):
        make_policy("ARC")  # type: ignore[arg-type]
