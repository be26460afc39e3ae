"""L1: the host-memory tier (arena, allocator, object table)."""

from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l1.records import L1Params, L1Stats, Slot

__all__ = ["L1Manager", "L1Params", "L1Stats", "Slot"]
