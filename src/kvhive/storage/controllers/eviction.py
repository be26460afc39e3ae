"""L2EvictionController: once per ``interval`` seconds, trims adapters with an ``eviction`` block.

Byte based, like kvhive's L1 (the reference counts keys):

* global mode (LRU, noop): when ``used >= trigger_watermark * capacity`` the adapter loses
  its least valuable unpinned objects worth ``eviction_ratio * used`` bytes.  An adapter
  without a known capacity is skipped (warned once at start-up).
* isolated mode (IsolatedLRU): every ``cache_salt`` with stored bytes is held against its
  quota from the ``QuotaRegistry`` (whitelist: no quota counts as 0, or the block's
  ``default_quota_gb`` when set — kvhive's fix for an empty tier).  A salt at or above
  ``watermark * limit`` loses all its objects when the limit is 0, else
  ``eviction_ratio`` of its bytes, least recent first.

Objects a prefetch is loading are pinned and never picked.  Victims of one pass go to the
adapter in one delete task.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.storage.l2.futures import outcome
from kvhive.storage.l2.managed import GiB, ManagedAdapter
from kvhive.storage.quota import QuotaRegistry

log = logging.getLogger(__name__)


class L2EvictionController:
    def __init__(
        self, adapters: Sequence[ManagedAdapter], quotas: QuotaRegistry, *, interval: float = 1.0
    ) -> None:
        self.adapters = [a for a in adapters if self._eligible(a)]
        self.quotas = quotas
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvhive-l2-evictor", daemon=True)
        self.evicted_objects = 0
        self.errors = 0

    @staticmethod
    def _eligible(adapter: ManagedAdapter) -> bool:
        ev = adapter.spec.eviction
        if ev is None:
            return False
        if ev.eviction_policy == "IsolatedLRU":
            if ev.default_quota_gb is None:
                log.warning("L2 %s: IsolatedLRU evicts every cache_salt without a quota (set one "
                            "with PUT /quota/<salt>, or eviction.default_quota_gb)", adapter.name)  # fmt: skip
            return True
        if not adapter.tracker.capacity:
            log.warning(
                "L2 %s: eviction needs a capacity (max_capacity_gb); disabled", adapter.name
            )
            return False
        return True

    def start(self) -> None:
        if self.adapters:
            self._thread.start()

    def tick(self) -> int:
        """One pass over every eligible adapter; returns objects evicted."""
        evicted = 0
        for adapter in self.adapters:
            victims = self._victims(adapter)
            if not victims:
                continue
            fut = adapter.delete(victims, why="evicted")
            try:
                fut.exception(timeout=adapter.spec.timeout_s)
            except FutureTimeout:
                log.warning("L2 %s: eviction delete timed out", adapter.name)
                continue
            except CancelledError:
                continue
            gone = sum(outcome(fut, len(victims)))
            evicted += gone
            if gone and adapter.bus.enabled:
                adapter.bus.publish(ev.L2KeysEvicted(key_count=gone, l2_name=adapter.name))
        self.evicted_objects += evicted
        return evicted

    def _victims(self, adapter: ManagedAdapter) -> list[ObjectKey]:
        ev = adapter.spec.eviction
        assert ev is not None
        usage = adapter.usage()
        watermark, ratio = ev.trigger_watermark, ev.eviction_ratio
        if ev.eviction_policy != "IsolatedLRU":
            if usage.used_bytes and usage.used_bytes >= watermark * usage.capacity_bytes:
                return adapter.tracker.pick(ratio * usage.used_bytes)
            return []
        default = ev.default_quota_gb
        victims: list[ObjectKey] = []
        for salt, used in usage.bytes_by_salt.items():
            limit = self.quotas.get(salt)
            if limit is None:
                limit = int(default * GiB) if default is not None else 0
            if used >= watermark * limit:
                victims += adapter.tracker.pick(used if limit == 0 else ratio * used, salt=salt)
        return victims

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # task boundary: count, log, keep the loop alive
                self.errors += 1
                log.exception("L2 eviction pass failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def status(self) -> dict[str, Any]:
        return {"adapters": [a.name for a in self.adapters], "evicted_objects": self.evicted_objects,
                "errors": self.errors, "healthy": not self._stop.is_set() or not self.adapters}  # fmt: skip
