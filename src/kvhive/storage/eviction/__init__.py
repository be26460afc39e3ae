"""Eviction policies and their registry.

``make_policy(name)`` resolves a policy by its flag value through a lazy table of
``"module:Class"`` paths.  The names are declared once, by the config
(:data:`kvhive.config.eviction.EvictionPolicy`); this table is keyed by the same names (a unit
test checks that they agree), so adding a policy is one name there, one line here and one
module beside it.
"""

from __future__ import annotations

import importlib
from typing import get_args

from kvhive.config.eviction import EvictionPolicy as PolicyName
from kvhive.storage.eviction.base import Evictable, EvictionPolicy

POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)

POLICIES: dict[PolicyName, str] = {  # name -> "module:Class", imported on first use
    "LRU": "kvhive.storage.eviction.lru:LRUPolicy",
    "IsolatedLRU": "kvhive.storage.eviction.isolated_lru:IsolatedLRUPolicy",
    "noop": "kvhive.storage.eviction.noop:NoopPolicy",
}


def make_policy(name: PolicyName) -> EvictionPolicy:
    """A fresh policy instance for ``name``; unknown names raise ValueError."""
    path = POLICIES.get(name)
    if path is None:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {POLICY_NAMES}")
    module, _, cls = path.partition(":")
    policy = getattr(importlib.import_module(module), cls)()
    assert isinstance(policy, EvictionPolicy)
    return policy


__all__ = ["POLICIES", "POLICY_NAMES", "Evictable", "EvictionPolicy", "PolicyName", "make_policy"]
