"""Registered engine workers ("instances"), their KV mappings and liveness.

An instance is one engine worker process, named by the random 63-bit
``instance_id`` it sends.  lmcache-driven instances own a copy backend
(:class:`~kvhive.transfer.backend.CopyBackend`: ``PagedKV`` over mapped shared memory
on CPU); engine-driven instances own only a chunk geometry.  Replacing or
dropping a registration closes its mappings at once (the reference keeps stale
mappings and leaks them, protocol.md §23 items 6-7).

Dropping a registration also hands its segments' proven creators (``segment_owners``)
to a :class:`~kvhive.transfer.shm.SegmentReaper`: a segment whose creator is gone (a
SIGKILLed worker never unlinks its own) is unlinked then, or at a later reaper tick once
the creator dies.  Segments kvhive did not record, or whose creator it cannot see (another
PID namespace), are never touched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kvhive.keys import InstanceId
from kvhive.observability import events as ev
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.transfer.backend import CopyBackend
from kvhive.transfer.shm import SegmentReaper

log = logging.getLogger(__name__)

Mode = Literal["lmcache_driven", "engine_driven"]


@dataclass(slots=True)
class ChunkGeometry:
    """Shape of one chunk object (object group 0) for a registration."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(slots=True)
class Instance:
    """One registered worker.  ``mapping`` is its copy backend (lmcache-driven only; closed
    by the registry when the instance is dropped).  ``kv_ranks`` grows as the worker
    stores and retrieves, so a drop knows whose lookup locks may be orphaned."""

    instance_id: InstanceId
    mode: Mode
    model_name: str
    world_size: int
    geometry: ChunkGeometry
    mapping: CopyBackend | None = None
    layout: str = ""
    shm_pool: bool = False
    kv_ranks: set[int] = field(default_factory=set)
    registered_at: float = 0.0
    last_seen: float = 0.0
    pinged: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "model_name": self.model_name,
            "world_size": self.world_size,
            "kv_cache_layout": self.layout,
            "object_shape": list(self.geometry.shape),
            "object_dtype": self.geometry.dtype,
            "object_nbytes": self.geometry.nbytes,
            "kv_ranks": sorted(self.kv_ranks),
            "seconds_since_seen": round(time.monotonic() - self.last_seen, 3),
        }


DropListener = Callable[[Instance, str], None]


class Registry:
    """Thread-safe table of instances with a reaper for silent ones."""

    def __init__(
        self,
        *,
        reap_timeout: float,
        registration_grace: float,
        clock: Callable[[], float] = time.monotonic,
        bus: EventBus = DISABLED,
        segments: SegmentReaper | None = None,
    ) -> None:
        self._instances: dict[int, Instance] = {}
        self.segments = segments if segments is not None else SegmentReaper()
        self._bus = bus
        self._lock = threading.Lock()
        self._clock = clock
        self._reap_timeout = reap_timeout
        self._grace = registration_grace
        self._listeners: list[DropListener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reaped = 0

    def on_drop(self, fn: DropListener) -> None:
        """``fn(instance, reason)`` runs after an instance is removed (any thread)."""
        self._listeners.append(fn)

    def add(self, inst: Instance) -> Instance | None:
        """Register ``inst``; returns the replaced registration (already closed), if any."""
        now = self._clock()
        inst.registered_at = inst.last_seen = now
        with self._lock:
            old = self._instances.get(inst.instance_id)
            self._instances[inst.instance_id] = inst
        if self._bus.enabled:
            self._bus.publish(
                ev.InstanceRegistered(
                    instance_id=inst.instance_id,
                    model_name=inst.model_name,
                    world_size=inst.world_size,
                    mode=inst.mode,
                )
            )
        if old is not None:
            log.info("instance %d re-registered: replacing its old mapping", inst.instance_id)
            self._closed(old, "replaced")
        return old

    def get(self, instance_id: int) -> Instance | None:
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.last_seen = self._clock()
        return inst

    def remove(self, instance_id: int, reason: str = "unregistered") -> Instance | None:
        with self._lock:
            inst = self._instances.pop(instance_id, None)
        if inst is not None:
            self._closed(inst, reason)
        return inst

    def ping(self, instance_id: int | None) -> None:
        if instance_id is None:
            return
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.last_seen = self._clock()
            inst.pinged = True

    def snapshot(self) -> list[Instance]:
        with self._lock:
            return list(self._instances.values())

    def has_layout(self, model_name: str, world_size: int) -> bool:
        return any(
            i.model_name == model_name and i.world_size == world_size for i in self.snapshot()
        )

    def serves_rank(self, model_name: str, kv_rank: int, exclude: int) -> bool:
        return any(
            i.instance_id != exclude and i.model_name == model_name and kv_rank in i.kv_ranks
            for i in self.snapshot()
        )

    def reap(self) -> list[Instance]:
        """Drop instances silent for longer than their limit; returns the dropped."""
        if self._reap_timeout <= 0:
            return []
        now = self._clock()
        with self._lock:
            dead = [
                i
                for i in self._instances.values()
                if now - i.last_seen > (self._reap_timeout if i.pinged else self._grace)
            ]
            for inst in dead:
                del self._instances[inst.instance_id]
        for inst in dead:
            self.reaped += 1
            log.warning(
                "reaping instance %d (%s): silent for %.0f s",
                inst.instance_id,
                inst.model_name,
                now - inst.last_seen,
            )
            self._closed(inst, "reaped")
        return dead

    def _closed(self, inst: Instance, reason: str) -> None:
        if self._bus.enabled:
            self._bus.publish(
                ev.InstanceDropped(
                    instance_id=inst.instance_id, model_name=inst.model_name, reason=reason
                )
            )
        if inst.mapping is not None:
            try:
                inst.mapping.close()
            except Exception:  # unmapping must not stop the drop
                log.exception("closing mapping of instance %d failed", inst.instance_id)
            try:
                self.segments.adopt(inst.mapping.segment_owners)
            except Exception:  # nor may freeing dead workers' segments
                log.exception("segment cleanup of instance %d failed", inst.instance_id)
        for fn in self._listeners:
            try:
                fn(inst, reason)
            except Exception:
                log.exception("drop listener failed")

    def start(self) -> None:
        if self._reap_timeout <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kvhive-reaper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(self._reap_timeout / 4, 0.05)):
            self.reap()
            try:
                self.segments.poll()
            except Exception:  # the reaper thread must keep running
                log.exception("segment cleanup failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for inst in self.snapshot():
            self.remove(inst.instance_id, "shutdown")

    def info(self) -> dict[str, Any]:
        return {
            "enabled": self._reap_timeout > 0,
            "reap_timeout_seconds": self._reap_timeout,
            "registration_grace_seconds": self._grace,
            "tracked_instances": len(self._instances),
            "reaped": self.reaped,
            "segments_watched": self.segments.watched,
            "segments_unlinked": self.segments.removed,
        }
