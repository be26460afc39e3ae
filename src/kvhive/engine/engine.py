"""CacheEngine: the protocol's operations, composed from services with one job each.

::

    CacheEngine (small ops, status)
      ├── lookups        LookupService    lookups, read locks, sessions  (engine/lookups.py)
      ├── transfers      TransferService  registration, store, retrieve   (engine/transfers.py)
      ├── engine_driven  EngineDriven     worker-copied transfers         (engine/engine_driven.py)
      └── kv_events      KVEventLog       subscribe_kv_events records     (observability/kv_events.py)
           shared: Registry (instances), Sessions, EngineStats + TransferBrackets

Thread model: registration, store, retrieve and the engine-driven prepare/commit run on
the caller connection's affinity thread; lookups and session operations on the CPU pool
(small lookups inline); ``ping``/``get_chunk_size``/``noop`` inline on the loop thread.
Stores commit before they reply, so a stored chunk is visible to the next lookup.

Handlers return domain results (records, plain values); the server's handler table and
dispatch turn them into reply frames.
"""

from __future__ import annotations

import logging
from typing import Any

from kvhive.engine.engine_driven import EngineDriven
from kvhive.engine.lookups import LookupService
from kvhive.engine.prefetch import Prefetcher
from kvhive.engine.registry import Instance, Registry
from kvhive.engine.sessions import Sessions
from kvhive.engine.stats import EngineStats, TransferBrackets
from kvhive.engine.transfers import TransferService
from kvhive.errors import BadRequest
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.observability.health import InFlight
from kvhive.observability.kv_events import DEFAULT_LOG_SIZE, KVEventLog, KVEventSubscription
from kvhive.observability.publish import EngineTelemetry
from kvhive.storage.l1.manager import L1Manager
from kvhive.wire import types as t

log = logging.getLogger(__name__)


class CacheEngine:
    """The default engine: services wired over one L1, registry and session table."""

    def __init__(
        self,
        *,
        l1: L1Manager,
        sessions: Sessions,
        registry: Registry,
        transfer_modes: frozenset[str],
        null_block_id: int,
        prefetcher: Prefetcher | None = None,
        bus: EventBus = DISABLED,
        inflight: InFlight,
        pool_name: str = "",
        pool_size: int = 0,
        kv_event_log_size: int = DEFAULT_LOG_SIZE,
        kv_events_l2: bool = False,
    ) -> None:
        self.l1 = l1
        self.sessions = sessions
        self.registry = registry
        self.chunk_size = sessions.chunk_size
        self.telemetry = EngineTelemetry(bus, self.chunk_size)
        self.inflight = inflight
        self.stats = EngineStats()
        brackets = TransferBrackets(self.telemetry, self.inflight, self.stats)
        self.lookups = LookupService(
            l1=l1,
            sessions=sessions,
            registry=registry,
            telemetry=self.telemetry,
            stats=self.stats,
            prefetcher=prefetcher,
        )
        self.transfers = TransferService(
            l1=l1,
            sessions=sessions,
            registry=registry,
            lookups=self.lookups,
            brackets=brackets,
            transfer_modes=transfer_modes,
            null_block_id=null_block_id,
        )
        self.engine_driven = EngineDriven(
            l1=l1,
            registry=registry,
            transfers=self.transfers,
            lookups=self.lookups,
            brackets=brackets,
            pool_name=pool_name,
            pool_size=pool_size,
        )
        registry.on_drop(self.lookups.release_instance)
        # Records for subscribe_kv_events (off with a disabled bus or --kv-event-log-size 0).
        # --kv-events-l2 adds the L2 tiers' STORAGE records.
        self.kv_events = KVEventLog(bus, kv_event_log_size, l2=kv_events_l2)
        registry.on_drop(self._instance_dropped)

    # ---- small ops -------------------------------------------------------------

    def get_chunk_size(self) -> int:
        return self.chunk_size

    def negotiate_chunk_size(self, required_chunk_alignment: int) -> int:
        """0.5.7: the chunk size, when it is a multiple of the engine's alignment (the LCM
        of its KV groups' tokens per block).  Unlike the reference, which rounds its size
        up to the alignment before the first session, kvhive never changes the size at
        runtime: chunk hashes, stored objects and L2 contents all depend on it, so a
        mismatch is refused (BadRequest: an error reply naming the flag to change)."""
        a = required_chunk_alignment
        if a < 1:
            raise BadRequest(f"required_chunk_alignment must be >= 1, got {a}")
        c = self.chunk_size
        if c % a:
            raise BadRequest(
                f"--chunk-size {c} is not a multiple of the engine's required chunk "
                f"alignment {a}; kvhive does not change its chunk size at runtime (chunk "
                f"hashes and stored objects depend on it): restart it with --chunk-size "
                f"{-(-c // a) * a} (or another multiple of {a})"
            )
        return c

    def get_experimental(self) -> list[str]:
        """Capabilities: ``kv_event_stream`` while the KV-event log records (0.5.6 workers
        subscribe only then)."""
        return [t.KV_EVENT_CAPABILITY] if self.kv_events.enabled else []

    def subscribe_kv_events(
        self, instance_id: int, model_name: str, cursor: int, max_events: int
    ) -> KVEventSubscription:
        """The stream source of ``instance_id``'s subscription (closing its previous one);
        BadRequest unless ``cursor >= 0`` and ``0 < max_events <= 1024``."""
        return self.kv_events.subscribe(instance_id, model_name, cursor, max_events)

    def _instance_dropped(self, inst: Instance, reason: str) -> None:
        """A reaped worker's subscription ends with it (as the reference's)."""
        if reason == "reaped":
            self.kv_events.close_instance(inst.instance_id)

    def noop(self) -> str:
        return "OK"

    def ping(self, instance_id: int | None) -> bool:
        """Liveness from a worker (``None``: the scheduler); always True."""
        self.registry.ping(instance_id)
        return True

    def report_block_allocation(
        self, instance_id: int, model_name: str, records: list[t.BlockAllocationRecord]
    ) -> None:
        """Telemetry only; the empty reply is the acknowledgement."""
        self.telemetry.block_allocation(instance_id, model_name, len(records))

    def clear(self, force: bool) -> None:
        """Drop every unlocked L1 object (``force``: locked ones too)."""
        removed = self.l1.clear(force=force)
        log.info("clear(force=%s) removed %d objects", force, removed)

    # ---- status --------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of the engine counters (``EngineStats``)."""
        return self.stats.snapshot()

    def status(self) -> dict[str, Any]:
        return {
            "active_sessions": len(self.sessions),
            "registered_instances": {
                str(i.instance_id): i.describe() for i in self.registry.snapshot()
            },
            "counters": self.stats.snapshot(),
            "kv_events": self.kv_events.status(),
        }
