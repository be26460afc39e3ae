"""Eviction policies and their registry.

``make_policy(name)`` resolves a policy by its flag value through a lazy table of
``"module:Class"`` paths, so adding a policy is one line here and one module beside it.
"""

from __future__ import annotations

import importlib
from typing import Literal, get_args

from kvhive.storage.eviction.base import Evictable, EvictionPolicy

PolicyName = Literal["LRU", "IsolatedLRU", "noop"]
POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)

_REGISTRY: dict[str, str] = {
    "LRU": "kvhive.storage.eviction.lru:LRUPolicy",
    "IsolatedLRU": "kvhive.storage.eviction.isolated_lru:IsolatedLRUPolicy",
    "noop": "kvhive.storage.eviction.noop:NoopPolicy",
}


def make_policy(name: PolicyName) -> EvictionPolicy:
    """A fresh policy instance for ``name``; unknown names raise ValueError."""
    path = _REGISTRY.get(name)
    if path is None:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {POLICY_NAMES}")
    module, _, cls = path.partition(":")
    policy = getattr(importlib.import_module(module), cls)()
    assert isinstance(policy, EvictionPolicy)
    return policy


__all__ = ["POLICY_NAMES", "Evictable", "EvictionPolicy", "PolicyName", "make_policy"]
