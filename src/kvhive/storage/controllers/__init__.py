"""L2 controllers: write-behind (store), prefetch, eviction, and the layer that owns them."""

from kvhive.storage.controllers.eviction import L2EvictionController
from kvhive.storage.controllers.layer import L2Layer, open_adapters
from kvhive.storage.controllers.prefetch import PrefetchController
from kvhive.storage.controllers.store import StoreController

__all__ = [
    "L2EvictionController",
    "L2Layer",
    "PrefetchController",
    "StoreController",
    "open_adapters",
]
