"""Shared helpers for storage tests: a fake clock, key factories, a small real L1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.eviction import make_policy
from kvhive.storage.l1 import L1Manager, L1Params

UNIT = 4096  # one object of the test layout occupies one aligned unit
UNITS = 64


class FakeClock:
    """Injectable clock; time moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_keys(n: int, *, salt: str = "", start: int = 0, rank: int = 0) -> list[ObjectKey]:
    """``n`` distinct keys (chunk i hashes to i) of one model and rank."""
    kv_rank = pack_kv_rank(max(2, rank + 1), rank)
    return [
        ObjectKey(i.to_bytes(8, "big"), "model", kv_rank, cache_salt=salt)
        for i in range(start, start + n)
    ]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_l1(clock: FakeClock) -> Iterator[Callable[..., L1Manager]]:
    """Factory of small eager L1s (64 units of 4 KiB); all are closed at teardown."""
    made: list[L1Manager] = []

    def factory(**overrides: Any) -> L1Manager:
        """``overrides``: L1Params fields, the L1Manager keywords, or ``policy_name``."""
        params: dict[str, Any] = {
            "size_bytes": UNITS * UNIT,
            "align_bytes": UNIT,
            "lazy": False,
            "init_bytes": 0,
            "write_ttl": 600.0,
            "read_ttl": 300.0,
            "watermark": 0.8,
            "eviction_ratio": 0.2,
            "shm_name": "",
        }
        kwargs: dict[str, Any] = {
            "policy": make_policy(overrides.pop("policy_name", "LRU")),
            "clock": clock,
        }
        for name, value in overrides.items():
            (params if name in params else kwargs)[name] = value
        l1 = L1Manager(L1Params(**params), **kwargs)
        made.append(l1)
        return l1

    yield factory
    for l1 in made:
        l1.close()


@pytest.fixture
def keys() -> Callable[..., list[ObjectKey]]:
    """The ``make_keys`` factory (fixtures, not imports: conftest is not importable)."""
    return make_keys
