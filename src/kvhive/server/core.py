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
from kvhive.engine.engine_driven import EngineDriven
from kvhive.engine.registry import Registry
from kvhive.engine.sessions import Sessions
from kvhive.hashing import build_token_hasher
from kvhive.server.dispatch import Dispatcher
from kvhive.server.pools import AffinityPool, CpuPool
from kvhive.server.transport import ZmqServer
from kvhive.storage.eviction import make_policy
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.quota import QuotaRegistry
from kvhive.transfer.shm import cleanup_stale_segments
from kvhive.wire.ops import OPS

log = logging.getLogger(__name__)

_MODES = {
    "auto": frozenset({"lmcache_driven", "engine_driven"}),
    "lmcache_driven": frozenset({"lmcache_driven"}),
    "engine_driven": frozenset({"engine_driven"}),
}


class KvhiveServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.started_at = time.time()
        mp, l1c, ev = config.mp, config.l1, config.eviction
        self.hasher = build_token_hasher(mp.hash_algorithm, mp.chunk_size, mp.none_hash_seed)
        self.quotas = QuotaRegistry()
        self.l1 = L1Manager(
            size_bytes=l1c.size_bytes,
            align_bytes=l1c.align_bytes,
            # A shared pool is mapped whole by engine-driven workers, so it is eager.
            lazy=l1c.use_lazy and not mp.shm_name,
            init_bytes=l1c.init_bytes,
            write_ttl=float(l1c.write_ttl_seconds),
            read_ttl=float(l1c.read_ttl_seconds),
            policy=make_policy(ev.policy),
            watermark=ev.trigger_watermark,
            eviction_ratio=ev.ratio,
            quotas=self.quotas,
            shm_name=mp.shm_name,
        )
        self.registry = Registry(
            reap_timeout=mp.worker_reap_timeout_seconds,
            registration_grace=mp.worker_registration_grace_seconds,
        )
        self.engine = CacheEngine(
            l1=self.l1,
            sessions=Sessions(self.hasher, ttl=mp.session_ttl_seconds),
            registry=self.registry,
            transfer_modes=_MODES[mp.supported_transfer_mode],
            null_block_id=mp.null_block_id,
        )
        pool_name = self.l1.arena.shm_segment_name if mp.shm_name else ""
        self.engine_driven = EngineDriven(
            self.engine, pool_name=pool_name or "", pool_size=l1c.size_bytes if pool_name else 0
        )
        handlers = {
            name: getattr(self.engine_driven, name, None) or getattr(self.engine, name)
            for name in OPS
        }
        self.affinity = AffinityPool(mp.max_gpu_workers)
        self.cpu = CpuPool(mp.max_cpu_workers)
        self.dispatcher = Dispatcher(handlers, affinity=self.affinity, cpu=self.cpu)
        urls = [f"tcp://{mp.host}:{mp.port}"]
        if mp.ipc_path:
            urls.append(f"ipc://{mp.ipc_path}")
        self.zmq = ZmqServer(urls, self.dispatcher.handle)
        self._stop = threading.Event()
        self._maint = threading.Thread(target=self._maintain, name="kvhive-sessions", daemon=True)
        self._closed = False

    def start(self) -> None:
        removed = cleanup_stale_segments()
        if removed:
            log.info("removed %d shared-memory segment(s) left by dead clients", len(removed))
        self.l1.start()
        self.registry.start()
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
                n = self.engine.reap_sessions()
                if n:
                    log.info("expired %d idle session(s)", n)
            except Exception:
                log.exception("session maintenance failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        log.info("shutting down")
        self._stop.set()
        self.zmq.close()
        self.affinity.shutdown(wait=True)
        self.cpu.shutdown(wait=False)
        self.registry.close()
        self.l1.close()
        log.info("shut down")

    def status(self) -> dict[str, Any]:
        l1 = self.l1.stats().to_dict()
        return {
            "is_healthy": bool(l1.get("healthy", True)),
            "engine_type": "kvhive",
            "version": __version__,
            "chunk_size": self.config.mp.chunk_size,
            "hash_algorithm": self.config.mp.hash_algorithm,
            "none_hash": self.hasher.none_hash.hex(),
            "supported_transfer_mode": self.config.mp.supported_transfer_mode,
            **self.engine.status(),
            "l1": l1,
            "worker_liveness": self.registry.info(),
            "requests": self.dispatcher.stats(),
            "transport": {
                "endpoints": self.zmq.endpoints,
                "malformed_frames": self.zmq.malformed_frames,
                "dropped_replies": self.zmq.dropped_replies,
            },
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
