"""Small real L1s for tests: the flag defaults as L1Params, sized for a test."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kvhive.storage.eviction import make_policy
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l1.records import L1Params

# The --l1-* and --eviction-* defaults, with a 64 MiB eager arena.
TEST_L1 = L1Params(
    size_bytes=64 << 20,
    align_bytes=4096,
    lazy=False,
    init_bytes=0,
    write_ttl=600.0,
    read_ttl=300.0,
    watermark=0.8,
    eviction_ratio=0.2,
    shm_name="",
)


def l1_params(**overrides: Any) -> L1Params:
    """``TEST_L1`` with some fields changed."""
    return replace(TEST_L1, **overrides)


def make_l1(*, policy: str = "LRU", manager_kwargs: dict[str, Any] | None = None,
            **overrides: Any) -> L1Manager:  # fmt: skip
    """An L1Manager over ``l1_params(**overrides)``; ``manager_kwargs`` go to L1Manager
    (clock, quotas, arena, bus).  The caller closes it."""
    return L1Manager(l1_params(**overrides), policy=make_policy(policy), **(manager_kwargs or {}))
