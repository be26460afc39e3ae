"""L2Layer: the configured adapters and their three controllers, with one lifecycle.

Start: adapters are opened in flag order (a failure closes those already open and raises),
the store controller listens to L1 commits, the eviction controller starts, and durable
adapters are scanned in the background so usage and eviction know what a previous run left.
Shutdown (the reverse, with deadlines): prefetches finish (each bounded by its deadlines),
write-behind drains for up to ``drain_timeout`` seconds and releases its L1 locks, the
evictor stops, then adapters close — all before L1 is released.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kvhive.config.l2 import L2Config
from kvhive.keys import ObjectKey
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.storage.controllers.eviction import L2EvictionController
from kvhive.storage.controllers.prefetch import PrefetchController, SizeOf
from kvhive.storage.controllers.store import StoreController
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l2.base import HostRegion
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.registry import build_adapter
from kvhive.storage.quota import QuotaRegistry

log = logging.getLogger(__name__)


def open_adapters(
    config: L2Config, bus: EventBus = DISABLED, host: HostRegion | None = None
) -> list[ManagedAdapter]:
    """Build every configured adapter in order; on failure close the opened ones and raise.
    ``host`` is the L1 arena, for adapters that register it with their backend."""
    opened: list[ManagedAdapter] = []
    try:
        for spec in config.specs:
            opened.append(ManagedAdapter(spec, build_adapter(spec, host), bus))
    except BaseException:
        for adapter in opened:
            adapter.close()
        raise
    return opened


class L2Layer:
    """Adapters + store, prefetch and eviction controllers (module docstring).

    Every setting comes from the caller's config: the L2 section (``config``) and the L1 read
    lock lifetime ``read_ttl_s`` (seconds; store tasks refresh their read locks every third of
    it).  ``drain_timeout`` (seconds) bounds the write-behind drain at close.
    """

    def __init__(
        self,
        config: L2Config,
        l1: L1Manager,
        quotas: QuotaRegistry,
        *,
        object_nbytes: SizeOf,
        read_ttl_s: float,
        drain_timeout: float = 10.0,
        bus: EventBus = DISABLED,
    ) -> None:
        self.config = config
        self.l1 = l1
        arena = l1.arena
        host = HostRegion(arena.base_address, arena.size_bytes, arena.align)
        self.adapters = open_adapters(config, bus, host)
        self.drain_timeout = drain_timeout
        self.store = StoreController(
            l1,
            self.adapters,
            skip_l1=config.store_policy == "skip_l1",
            pin_refresh_s=max(0.5, read_ttl_s / 3),
        )
        self.prefetch = PrefetchController(
            l1,
            self.adapters,
            object_nbytes=object_nbytes,
            retain=config.prefetch_policy == "retain",
            max_in_flight=config.prefetch_max_in_flight,
        )
        self.eviction = L2EvictionController(self.adapters, quotas)
        self._scan = threading.Thread(
            target=self._rebuild_usage, name="kvhive-l2-scan", daemon=True
        )
        self._closed = False

    @property
    def enabled(self) -> bool:
        return bool(self.adapters)

    def start(self) -> None:
        if not self.adapters:
            return
        self.l1.add_listener(self.store.on_l1_event)
        self.store.start()
        self.eviction.start()
        self._scan.start()

    def _rebuild_usage(self) -> None:
        for adapter in self.adapters:
            if adapter.adapter.durable:
                adapter.rebuild_usage()

    def usage_by_salt(self) -> dict[str, int]:
        """Bytes per cache_salt summed over all adapters (L1 does not count; /quota)."""
        total: dict[str, int] = {}
        for adapter in self.adapters:
            for salt, n in adapter.usage().bytes_by_salt.items():
                total[salt] = total.get(salt, 0) + n
        return total

    def find(self, adapter: str | None) -> ManagedAdapter:
        """The adapter named by type (first of that type), index, or label; default the first."""
        if not self.adapters:
            raise LookupError("no L2 adapters are configured")
        if adapter is None:
            return self.adapters[0]
        for a in self.adapters:
            if adapter in (a.spec.type, str(a.index), a.name):
                return a
        raise LookupError(f"unknown L2 adapter {adapter!r}")

    def list_objects(
        self, adapter: str | None, model_name: str | None, start: int, limit: int
    ) -> tuple[ManagedAdapter, list[tuple[ObjectKey, int]], int | None]:
        """One page of an adapter's objects from its usage tracker (which a restart
        rebuilds by scanning durable adapters); returns (adapter, items, next start)."""
        a = self.find(adapter)
        items = [
            (k, n)
            for k, n in a.tracker.snapshot()
            if model_name is None or k.model_name == model_name
        ]
        page = items[start : start + limit]
        return a, page, (start + limit if start + limit < len(items) else None)

    def delete_objects(
        self, keys: list[ObjectKey], adapter: str | None, timeout: float | None = None
    ) -> tuple[int, int]:
        """Delete ``keys`` from one adapter, or from all when ``adapter`` is None;
        returns (deleted, skipped).  The adapters delete at once; each one's task gets
        ``timeout`` seconds from the call (None: the adapter's own ``timeout_s``), so the
        call lasts at most the longest of them, not their sum.  Raises on a failed or late
        backend.  There is no force here: L2 has no reader locks; a load racing a delete
        gets the whole object or a miss (the integrity trailer rejects a torn read)."""
        targets = [self.find(adapter)] if adapter is not None else list(self.adapters)
        start = time.monotonic()
        tasks = [(a, a.delete(keys)) for a in targets]
        deleted = 0
        for a, task in tasks:
            wait = a.spec.timeout_s if timeout is None else timeout
            deleted += sum(task.result(timeout=max(0.0, start + wait - time.monotonic())))
        return deleted, len(keys) * len(targets) - deleted

    def unavailable(self) -> list[str]:
        """Reasons of the adapters that count as unavailable now (``l2/health.py``)."""
        return [r for a in self.adapters if (r := a.unavailable_reason()) is not None]

    def status(self) -> dict[str, Any]:
        return {
            "store_policy": self.config.store_policy,
            "prefetch_policy": self.config.prefetch_policy,
            "adapters": [{**a.status(), "usage_scan": a.tracker.status()} for a in self.adapters],
            "store": self.store.status(),
            "prefetch": self.prefetch.status(),
            "eviction": self.eviction.status(),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.prefetch.close()
        self.store.close(self.drain_timeout)
        self.eviction.close()
        for adapter in self.adapters:
            adapter.close()
