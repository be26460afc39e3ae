"""Prometheus metrics: the reference's names, plus per-tier hit rates and kvhive's own.

Names are what the reference's OTel → Prometheus export produces (``lmcache_mp.l1_read`` with
unit ``chunks`` → ``lmcache_mp_l1_read_chunks_total``), so existing dashboards keep working.
``service.instance.id`` (and ``service.name``) appear on the ``target_info`` series, as in the
reference.  Labels that the reference adds only when non-empty (``cache_salt``) are always
present here with ``""`` for none — Prometheus treats an empty label as an absent one.  The
event-fed metrics are a table of specs (``metric_table.py``) built by one loop.

Counters fed by events count on the bus thread.  Gauges and the ``kvhive_engine_*`` counters
are read from live state at scrape time (:class:`Sources`), so they stay exact even when the
bus drops events (a reference defect).  Per-chunk lifecycle histograms are sampled with
``--metrics-sample-rate`` through a deterministic gate on the chunk hash (stable across
restarts, unlike the reference's salted ``hash()``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability import metric_table as M
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType
from kvhive.observability.metric_table import MetricSpec, build_metrics

prometheus_client.disable_created_metrics()  # the reference's exposition has no *_created

_GATE_MOD = 1_000_003
_TRACK_CAP = 100_000
_EVICT_REUSE_CAP_S = 300.0
HISTORY_SECONDS = 300


@dataclass
class Sources:
    """Live-state readers the scrape-time collector calls (each returns plain data)."""

    l1_stats: Callable[[], Mapping[str, Any]] = dict
    engine_counters: Callable[[], Mapping[str, int]] = dict
    active_prefetch_jobs: Callable[[], int] = lambda: 0
    active_sessions: Callable[[], int] = lambda: 0
    registered_instances: Callable[[], int] = lambda: 0
    l2_health: Callable[[], Iterable[tuple[str, int, Any]]] = list
    """``(name, index, l2.health.HealthSnapshot)`` per adapter."""
    bus: EventBus | None = None
    extra: list[Callable[[], Iterable[Metric]]] = field(default_factory=list)


def sampled(key: ObjectKey, threshold: int) -> bool:
    """Deterministic per-chunk sampling gate (same chunks across restarts)."""
    return int.from_bytes(key.chunk_hash[:8], "little") % _GATE_MOD < threshold


class MetricsSubscriber:
    """Event-fed counters and histograms (all callbacks on the bus thread)."""

    name = "metrics"

    def __init__(self, registry: CollectorRegistry, *, sample_rate: float) -> None:
        """Register every metric of :data:`~kvhive.observability.metric_table.METRICS` in
        ``registry``; ``sample_rate`` (0..1) gates the per-chunk lifecycle histograms."""
        self._threshold = int(sample_rate * _GATE_MOD)
        self._metrics = build_metrics(registry)
        self._children: dict[tuple[MetricSpec, tuple[Any, ...]], Any] = {}
        # state kept on the bus thread (read by the scrape-time collector)
        self.lookup_tokens = {"requested": 0, "l1": 0, "l2": 0}
        self.lookup_history: deque[list[int]] = deque(maxlen=HISTORY_SECONDS)
        """Per wall-clock second: [second, requested, l1 hit, l2 hit] tokens (dashboard)."""
        self.l2_loaded_by_adapter: dict[tuple[str, str], int] = {}
        self.inflight_stores: dict[tuple[int, int], tuple[str, float]] = {}
        self.inflight_loads: dict[tuple[int, int], tuple[str, float, int]] = {}
        self.last_copy_gbps: dict[str, float] = {}
        self._alloc_at: dict[ObjectKey, float] = {}
        self._touch_at: dict[ObjectKey, float] = {}
        self._evicted_at: dict[ObjectKey, float] = {}

    @property
    def l2_failures(self) -> Counter | Histogram:
        """The ``kvhive_l2_failures`` counter (the dashboard sums it per adapter)."""
        return self._metrics[M.L2_FAILURES]

    def _child(self, spec: MetricSpec, *values: Any) -> Any:
        """The metric of ``spec`` with label ``values`` (itself when it has no labels), cached:
        prometheus-client validates and converts the labels and takes a lock on every
        ``labels()`` call, several times the cost of the ``inc`` after it.  Children are never
        removed here, so a cached one stays the registered one."""
        key = (spec, values)
        child = self._children.get(key)
        if child is None:
            metric = self._metrics[spec]
            child = self._children[key] = metric.labels(*values) if values else metric
        return child

    def subscriptions(self) -> Mapping[EventType, Callable[[Any], None]]:
        T = EventType
        return {
            T.L1_READ_FINISHED: self._l1_read,
            T.L1_WRITE_FINISHED: self._l1_write,
            T.L1_KEYS_EVICTED: self._l1_evicted,
            T.L1_EVICTION_LOOP_TICK: self._tick,
            T.L1_ALLOCATION_FAILED: self._alloc_failed,
            T.L1_READ_FAILED: self._read_failed,
            T.MP_LOOKUP_PREFETCH_END: self._lookup_end,
            T.MP_STORE_SUBMITTED: lambda e: self._child(M.SUB_STORES, e.device).inc(),
            T.MP_RETRIEVE_SUBMITTED: lambda e: self._child(M.SUB_RETRIEVES, e.device).inc(),
            T.MP_STORE_END: self._store_end,
            T.MP_RETRIEVE_END: self._retrieve_end,
            T.L2_STORE_SUBMITTED: self._l2_store_submitted,
            T.L2_STORE_COMPLETED: self._l2_store_completed,
            T.L2_LOAD_TASK_SUBMITTED: self._l2_load_submitted,
            T.L2_LOAD_TASK_COMPLETED: self._l2_load_completed,
            T.L2_KEYS_EVICTED: lambda e: self._child(M.L2_EVICTED).inc(e.key_count),
            T.L2_PREFETCH_FAILED: self._l2_prefetch_failed,
            T.TIMEOUT_RAISED: lambda e: self._child(M.TIMEOUTS, e.exception_type).inc(),
        }

    # ---- L1 ----------------------------------------------------------------------------------

    def _per_salt(self, spec: MetricSpec, keys: Iterable[ObjectKey], tag: str) -> None:
        for salt, n in ev.salt_counts(list(keys)).items():
            self._child(spec, salt, tag).inc(n)

    def _l1_read(self, e: ev.L1ReadFinished) -> None:
        self._per_salt(M.L1_READ, e.keys, e.l1_tag)
        for key in self._gated(e.keys):
            self._touch(key, e.timestamp, e.l1_tag)

    def _l1_write(self, e: ev.L1WriteFinished) -> None:
        self._per_salt(M.L1_WRITE, e.keys, e.l1_tag)
        for key in self._gated(e.keys):
            gone = self._evicted_at.pop(key, None)
            if gone is not None:
                self._child(M.EVICT_REUSE, e.l1_tag).observe(
                    min(e.timestamp - gone, _EVICT_REUSE_CAP_S)
                )
            if len(self._alloc_at) < _TRACK_CAP:
                self._alloc_at[key] = e.timestamp
                self._touch_at[key] = e.timestamp

    def _l1_evicted(self, e: ev.L1KeysEvicted) -> None:
        self._per_salt(M.L1_EVICTED, e.keys, e.l1_tag)
        for key in self._gated(e.keys):
            born = self._alloc_at.pop(key, None)
            last = self._touch_at.pop(key, None)
            if born is not None:
                self._child(M.LIFETIME, e.l1_tag).observe(max(0.0, e.timestamp - born))
            if last is not None:
                self._child(M.IDLE, e.l1_tag).observe(max(0.0, e.timestamp - last))
            if len(self._evicted_at) >= _TRACK_CAP:  # sweep: long waits count as the cap
                for old in list(self._evicted_at)[: _TRACK_CAP // 10]:
                    self._evicted_at.pop(old)
                    self._child(M.EVICT_REUSE, e.l1_tag).observe(_EVICT_REUSE_CAP_S)
            self._evicted_at[key] = e.timestamp

    def _touch(self, key: ObjectKey, now: float, tag: str) -> None:
        last = self._touch_at.get(key)
        if last is not None:
            self._child(M.REUSE_GAP, tag).observe(max(0.0, now - last))
            self._touch_at[key] = now

    def _gated(self, keys: Iterable[ObjectKey]) -> Iterable[ObjectKey]:
        t = self._threshold
        return [k for k in keys if sampled(k, t)] if t < _GATE_MOD else keys

    def _tick(self, e: ev.L1EvictionTick) -> None:
        self._child(M.TICKS).inc()
        if e.triggered:
            self._child(M.TRIGGERED).inc()

    def _alloc_failed(self, e: ev.L1AllocationFailed) -> None:
        self._child(M.ALLOC_FAIL, e.during, e.model_name).inc(len(e.keys))

    def _read_failed(self, e: ev.L1ReadFailed) -> None:
        self._child(M.READ_FAIL, e.during, e.reason, e.model_name).inc(len(e.keys))

    # ---- lookups and transfers -----------------------------------------------------------------

    def _lookup_end(self, e: ev.LookupEnd) -> None:
        lab = (e.model_name, e.cache_salt)
        self._child(M.LOOKUPS, *lab).inc()
        self._child(M.REQUESTED, *lab).inc(e.requested_tokens)
        self._child(M.HIT, *lab).inc(e.hit_tokens)
        self._child(M.HIT_L1, *lab).inc(e.l1_hit_tokens)
        self._child(M.HIT_L2, *lab).inc(e.l2_hit_tokens)
        self._child(M.HIT_L1_KEYS, *lab).inc(e.l1_hit_keys)
        self._child(M.HIT_L2_KEYS, *lab).inc(e.l2_hit_keys)
        if e.early_exit_reason:
            self._child(M.EARLY_EXIT, *lab, e.early_exit_reason).inc()
        t = self.lookup_tokens
        t["requested"] += e.requested_tokens
        t["l1"] += e.l1_hit_tokens
        t["l2"] += e.l2_hit_tokens
        second = int(e.timestamp)
        hist = self.lookup_history
        if not hist or hist[-1][0] != second:
            hist.append([second, 0, 0, 0])
        bucket = hist[-1]
        bucket[1] += e.requested_tokens
        bucket[2] += e.l1_hit_tokens
        bucket[3] += e.l2_hit_tokens

    def _store_end(self, e: ev.StoreEnd) -> None:
        self._child(M.FIN_STORES, e.device).inc()
        self._child(M.STORED_BYTES, e.device).inc(e.total_bytes)
        self._throughput(M.STORE_TP, "store", e)

    def _retrieve_end(self, e: ev.RetrieveEnd) -> None:
        self._child(M.FIN_RETRIEVES, e.device).inc()
        self._child(M.RETRIEVED_BYTES, e.device).inc(e.total_bytes)
        if e.retrieved_count > 0:
            self._child(M.CHUNKS_LOADED, str(e.engine_id), e.model_name, e.cache_salt).inc(
                e.retrieved_count
            )
        self._throughput(M.LOAD_TP, "retrieve", e)

    def _throughput(self, spec: MetricSpec, direction: str, e: Any) -> None:
        if e.total_bytes <= 0 or e.elapsed_seconds <= 0:
            return
        gbps = e.total_bytes / e.elapsed_seconds / 1e9
        self._child(spec, e.device, str(e.engine_id), e.model_name).observe(gbps)
        self.last_copy_gbps[direction] = gbps

    # ---- L2 ----------------------------------------------------------------------------------

    def _l2_store_submitted(self, e: ev.L2StoreSubmitted) -> None:
        self._child(M.L2_SUB).inc()
        self._child(M.L2_SUB_OBJ, e.l2_name).inc(e.key_count)
        self.inflight_stores[(e.adapter_index, e.task_id)] = (e.l2_name, e.timestamp)

    def _l2_store_completed(self, e: ev.L2StoreCompleted) -> None:
        self._child(M.L2_DONE, e.l2_name).inc()
        self._child(M.L2_DONE_OBJ, e.l2_name).inc(e.succeeded_count)
        if e.failed_count:
            self._child(M.L2_FAILURES, e.l2_name, "store").inc(e.failed_count)
        start = self.inflight_stores.pop((e.adapter_index, e.task_id), None)
        if start is not None and e.bytes_transferred > 0 and e.timestamp > start[1]:
            gbps = e.bytes_transferred / (e.timestamp - start[1]) / 1e9
            self._child(M.L2_STORE_TP, e.l2_name).observe(gbps)

    def _l2_load_submitted(self, e: ev.L2LoadSubmitted) -> None:
        self.inflight_loads[(e.request_id, e.adapter_index)] = (
            e.l2_name, e.timestamp, e.total_bytes,
        )  # fmt: skip

    def _l2_load_completed(self, e: ev.L2LoadCompleted) -> None:
        self._child(M.L2_LOAD_DONE, e.l2_name).inc()
        self._child(M.L2_LOADED, e.l2_name).inc(e.loaded_count)
        if e.failed_count:
            self._child(M.L2_FAILURES, e.l2_name, "load").inc(e.failed_count)
        adapter = (str(e.adapter_index), e.l2_name)
        self.l2_loaded_by_adapter[adapter] = (
            self.l2_loaded_by_adapter.get(adapter, 0) + e.loaded_count
        )
        start = self.inflight_loads.pop((e.request_id, e.adapter_index), None)
        if start is not None and start[2] > 0 and e.timestamp > start[1]:
            self._child(M.L2_LOAD_TP, e.l2_name).observe(start[2] / (e.timestamp - start[1]) / 1e9)

    def _l2_prefetch_failed(self, e: ev.L2PrefetchFailed) -> None:
        self._child(M.L2_PF_FAIL, e.reason, e.model_name).inc(e.key_count)
        if e.reason == "timeout":
            self._child(M.PF_TIMEOUTS).inc()


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` (for /metrics)."""
    return prometheus_client.generate_latest(registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What generate_latest() writes (the classic text format every Prometheus reads)."""
