"""L2 tiers: the adapter contract, its helpers and the adapter registry.

Public API for adapter authors: :class:`L2Adapter` (asynchronous batch contract),
:class:`ObjectStore` (synchronous per-object I/O that kvhive runs on a pool),
:class:`PooledAdapter`, :class:`Usage`, and the errors in :mod:`kvhive.errors`
(``ObjectMissing``, ``CorruptObject``, ``CapacityExceeded``, ``L2Error``), and the per-key
failure outcomes an :class:`L2Adapter` may report (``MISSING``, ``CORRUPT``, ``ERROR``).
"""

from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.futures import CORRUPT, ERROR, MISSING, Miss
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.pooled import PooledAdapter
from kvhive.storage.l2.registry import BUILDERS, build_adapter
from kvhive.storage.l2.tracker import Tracker, Usage

__all__ = [
    "BUILDERS",
    "CORRUPT",
    "ERROR",
    "MISSING",
    "Miss",
    "L2Adapter",
    "ManagedAdapter",
    "ObjectStore",
    "PooledAdapter",
    "Tracker",
    "Usage",
    "build_adapter",
]
