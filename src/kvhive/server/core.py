"""KvhiveServer: builds the layers from a ServerConfig and runs their lifecycle.

Start order: L1 → engine → pools → ZMQ.  Shutdown is the reverse with deadlines:
stop taking frames, finish in-flight work, drop registrations (unmapping their
shared memory), release L1 (unlinking a shared pool).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kvhive import __version__
from kvhive.config import ServerConfig
from kvhive.engine.engine import CacheEngine
from kvhive.engine.registry import Registry
from kvhive.engine.sessions import Sessions
from kvhive.hashing import build_token_hasher
from kvhive.keys import ObjectKey, unpack_kv_rank
from kvhive.observability.health import InFlight
from kvhive.observability.kv_publisher import KVEventPublisher
from kvhive.observability.setup import Observability, Sources
from kvhive.plugins import PluginLauncher
from kvhive.server.dispatch import Dispatcher
from kvhive.server.handlers import build_routes
from kvhive.server.modules import load_server_modules
from kvhive.server.pools import AffinityPool, CpuPool
from kvhive.server.streams import DEFAULT_IDLE_CLOSE_S, StreamManager
from kvhive.server.transport import ZmqServer
from kvhive.storage.controllers import L2Layer
from kvhive.storage.eviction import make_policy
from kvhive.storage.l1 import L1Manager, L1Params
from kvhive.storage.quota import QuotaRegistry
from kvhive.transfer.shm import cleanup_stale_segments

log = logging.getLogger(__name__)

SHUTDOWN_POOL_TIMEOUT_S = 10.0

_MODES = {
    "auto": frozenset({"lmcache_driven", "engine_driven"}),
    "lmcache_driven": frozenset({"lmcache_driven"}),
    "engine_driven": frozenset({"engine_driven"}),
}


class KvhiveServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.started_at = time.time()
        # --server-module: imported first, so a module that fails to load costs nothing else.
        self.modules = load_server_modules(config.mp.server_module_specs, config)
        # Observability first: producers capture the bus when they are built.
        self.obs = Observability(config)
        bus = self.obs.bus
        self.inflight = InFlight(config.http_admin.health_copy_deadline_seconds)
        mp, l1c, ev = config.mp, config.l1, config.eviction
        self.hasher = build_token_hasher(mp.hash_algorithm, mp.chunk_size, mp.none_hash_seed)
        self.quotas = QuotaRegistry()
        self.l1 = L1Manager(
            L1Params(
                size_bytes=l1c.size_bytes,
                align_bytes=l1c.align_bytes,
                # A shared pool is mapped whole by engine-driven workers, so it is eager.
                lazy=l1c.use_lazy and not mp.shm_name,
                init_bytes=l1c.init_bytes,
                write_ttl=float(l1c.write_ttl_seconds),
                read_ttl=float(l1c.read_ttl_seconds),
                watermark=ev.trigger_watermark,
                eviction_ratio=ev.ratio,
                shm_name=mp.shm_name,
            ),
            policy=make_policy(ev.policy),
            quotas=self.quotas,
            bus=bus,
        )
        try:  # L2 adapters open files and connections; give L1 back if one fails
            self.l2 = L2Layer(
                config.l2,
                self.l1,
                self.quotas,
                object_nbytes=self._object_nbytes,
                read_ttl_s=float(l1c.read_ttl_seconds),
                bus=bus,
            )
        except BaseException:
            self.l1.close()
            raise
        self.registry = Registry(
            reap_timeout=mp.worker_reap_timeout_seconds,
            registration_grace=mp.worker_registration_grace_seconds,
            bus=bus,
        )
        pool_name = (self.l1.arena.shm_segment_name or "") if mp.shm_name else ""
        self.engine = CacheEngine(
            l1=self.l1,
            sessions=Sessions(self.hasher, ttl=mp.session_ttl_seconds),
            registry=self.registry,
            transfer_modes=_MODES[mp.supported_transfer_mode],
            null_block_id=mp.null_block_id,
            prefetcher=self.l2.prefetch if self.l2.enabled else None,
            bus=bus,
            inflight=self.inflight,
            pool_name=pool_name,
            pool_size=l1c.size_bytes if pool_name else 0,
            kv_event_log_size=mp.kv_event_log_size,
            kv_events_l2=config.kv_events.kv_events_l2,
        )
        self.kv_publisher: KVEventPublisher | None = None
        if config.kv_events.publishing:  # binds now: a bad endpoint exits 2 naming its flag
            try:
                self.kv_publisher = KVEventPublisher(
                    self.engine.kv_events, config.kv_events, block_size=mp.chunk_size
                )
            except BaseException:
                self.l2.close()
                self.l1.close()
                raise
        self.engine_driven = self.engine.engine_driven
        self.affinity = AffinityPool(mp.max_gpu_workers or mp.max_workers)
        self.cpu = CpuPool(mp.max_cpu_workers or mp.max_workers)
        self.dispatcher = Dispatcher(
            build_routes(self.engine, self.modules),
            affinity=self.affinity,
            cpu=self.cpu,
            # A stream of a connection silent this long ends (workers ping every 10 s).
            streams=StreamManager(
                idle_close_s=mp.worker_reap_timeout_seconds or DEFAULT_IDLE_CLOSE_S
            ),
        )
        urls = [f"tcp://{mp.host}:{mp.port}"]
        if mp.ipc_path:
            urls.append(f"ipc://{mp.ipc_path}")
        self.zmq = ZmqServer(urls, self.dispatcher.handle, streams=self.dispatcher.streams)
        self.plugins = PluginLauncher(config)
        self.obs.attach(
            Sources(
                l1_stats=lambda: self.l1.stats().to_dict(),
                engine_counters=lambda: self.engine.counters,
                active_prefetch_jobs=self._active_lookups,
                active_sessions=lambda: len(self.engine.sessions),
                registered_instances=lambda: len(self.registry.snapshot()),
                l2_health=lambda: [
                    (a.name, a.index, a.health.snapshot()) for a in self.l2.adapters
                ],
                extra=[self.kv_publisher.metrics] if self.kv_publisher else [],
            )
        )
        self._stop = threading.Event()
        self._maint = threading.Thread(target=self._maintain, name="kvhive-sessions", daemon=True)
        self._closed = False
        self._running = False

    def start(self) -> None:
        removed = cleanup_stale_segments()
        if removed:
            log.info("removed %d shared-memory segment(s) left by dead clients", len(removed))
        self.obs.start()
        self._running = True
        self.l1.start()
        self.l2.start()
        self.registry.start()
        if self.kv_publisher is not None:
            self.kv_publisher.start()
        self.zmq.start()
        self._maint.start()
        log.info(
            "kvhive %s serving ZMQ on %s (chunk %d, %s, L1 %.2f GiB, %s)",
            __version__,
            ", ".join(self.zmq.endpoints),
            self.config.mp.chunk_size,
            self.config.mp.hash_algorithm,
            self.config.l1.size_gb,
            self.config.eviction.policy,
        )

    def _maintain(self) -> None:
        interval = max(0.5, min(60.0, self.config.mp.session_ttl_seconds / 4))
        while not self._stop.wait(interval):
            try:
                n = self.engine.lookups.reap_sessions()
                if n:
                    log.info("expired %d idle session(s)", n)
            except Exception:
                log.exception("session maintenance failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        log.info("shutting down")
        self.plugins.stop()
        self._stop.set()
        self.zmq.close()
        # In-flight copies finish (bounded: a copy stuck in a worker's memory is abandoned).
        self.affinity.shutdown(timeout=SHUTDOWN_POOL_TIMEOUT_S)
        self.cpu.shutdown(timeout=SHUTDOWN_POOL_TIMEOUT_S)
        self.modules.close()  # no handler runs any more
        self.obs.stop()  # flush the bus and its subscribers before the engine goes
        if self.kv_publisher is not None:  # after the bus: it publishes the last records
            self.kv_publisher.close()
        self.l2.close()  # prefetches end, write-behind drains, adapters close
        self.registry.close()
        self.l1.close()
        log.info("shut down")

    def _object_nbytes(self, key: ObjectKey) -> int | None:
        """Logical size of ``key``'s object: the chunk geometry of a registration serving
        its model and world size (None when no such client is registered)."""
        world, _ = unpack_kv_rank(key.kv_rank)
        for inst in self.registry.snapshot():
            if inst.model_name == key.model_name and inst.world_size == world:
                return inst.geometry.nbytes
        return None

    def _active_lookups(self) -> int:
        sessions = self.engine.sessions.snapshot()
        return sum(1 for s in sessions if s.job is not None and not s.job.is_done())

    def health(self) -> tuple[bool, list[str]]:
        """Component health: (healthy, reasons).  A stuck copy or L2 load (past
        --health-copy-deadline-seconds), a failed L1 self-check, a dead event-bus dispatcher
        or a ZMQ loop that has not turned for ``LOOP_STALL_S`` (no request is answered)
        make the server unhealthy."""
        reasons: list[str] = []
        loop = self.zmq.loop_problem()
        if loop is not None:
            reasons.append(loop)
        if not self.l1.stats().healthy:
            reasons.append("L1 allocator self-check failed")
        for op in self.inflight.stuck():
            reasons.append(
                f"{op['kind']} {op['detail']} running for {op['running_seconds']} s on "
                f"{op['thread']} (deadline {self.inflight.deadline:g} s)"
            )
        bus = self.obs.bus
        if bus.enabled and self._running and not self._closed and not bus.alive:
            reasons.append("event bus dispatcher is not running")
        return not reasons, reasons

    def degraded(self) -> list[str]:
        """What works less than configured while the server still serves every request:
        L2 tiers that stopped answering (the node serves from L1 and the other tiers).
        Not a reason to restart or drain the node, so ``/healthcheck`` stays 200."""
        return self.l2.unavailable()

    def status(self) -> dict[str, Any]:
        l1 = self.l1.stats().to_dict()
        healthy, reasons = self.health()
        return {
            "is_healthy": healthy,
            "unhealthy_reasons": reasons,
            "degraded_reasons": self.degraded(),
            "engine_type": "kvhive",
            "version": __version__,
            "chunk_size": self.config.mp.chunk_size,
            "hash_algorithm": self.config.mp.hash_algorithm,
            "none_hash": self.hasher.none_hash.hex(),
            "supported_transfer_mode": self.config.mp.supported_transfer_mode,
            **self.engine.status(),
            "l1": l1,
            "l1_populate": self.l1.arena.populate_status(),
            "l2": self.l2.status(),
            "kv_publisher": self.kv_publisher.status() if self.kv_publisher else None,
            "worker_liveness": self.registry.info(),
            "requests": self.dispatcher.stats(),
            "transport": {
                "endpoints": self.zmq.endpoints,
                "malformed_frames": self.zmq.malformed_frames,
                "dropped_replies": self.zmq.dropped_replies,
                "dropped_replies_peer_full": self.zmq.dropped_full,
                "dropped_replies_by_peer": self.zmq.dropped_by_peer(),
                "loop_stalled_seconds": round(self.zmq.stalled_for(), 3),
                "outstanding_requests": self.dispatcher.outstanding(),
                "bound_connections": len(self.affinity),
                "streams": self.dispatcher.streams.stats(),
            },
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "service_instance_id": self.obs.instance_id,
            "inflight_copies": len(self.inflight),
            "event_bus": self.obs.bus.stats(),
            "runtime_plugins": self.plugins.status(),
            "server_modules": self.modules.status(),
        }
