"""Prometheus metrics: the reference's names, plus per-tier hit rates and kvhive's own.

Names are what the reference's OTel → Prometheus export produces (``lmcache_mp.l1_read`` with
unit ``chunks`` → ``lmcache_mp_l1_read_chunks_total``), so existing dashboards keep working.
``service.instance.id`` (and ``service.name``) appear on the ``target_info`` series, as in the
reference.  Labels that the reference adds only when non-empty (``cache_salt``) are always
present here with ``""`` for none — Prometheus treats an empty label as an absent one.

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
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType

prometheus_client.disable_created_metrics()  # the reference's exposition has no *_created

DEFAULT_BUCKETS = (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
LIFECYCLE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)
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
    bus: EventBus | None = None
    extra: list[Callable[[], Iterable[Metric]]] = field(default_factory=list)


def sampled(key: ObjectKey, threshold: int) -> bool:
    """Deterministic per-chunk sampling gate (same chunks across restarts)."""
    return int.from_bytes(key.chunk_hash[:8], "little") % _GATE_MOD < threshold


class MetricsSubscriber:
    """Event-fed counters and histograms (all callbacks on the bus thread)."""

    name = "metrics"

    def __init__(self, registry: CollectorRegistry, *, sample_rate: float) -> None:
        r = registry
        self._threshold = int(sample_rate * _GATE_MOD)
        self._children: dict[tuple[Any, tuple[Any, ...]], Any] = {}

        def c(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=r)

        def h(name: str, doc: str, labels: Iterable[str], buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, list(labels), registry=r, buckets=list(buckets))

        salt_tag = ("cache_salt", "l1_tag")
        # L1
        self.l1_read = c("lmcache_mp_l1_read_chunks", "Chunks read from L1.", salt_tag)
        self.l1_write = c("lmcache_mp_l1_write_chunks", "Chunks written to L1.", salt_tag)
        self.l1_evicted = c("lmcache_mp_l1_evicted_chunks", "Chunks removed from L1.", salt_tag)
        self.ticks = c("lmcache_mp_l1_eviction_loop_ticks", "L1 eviction loop ticks.")
        self.triggered = c(
            "lmcache_mp_l1_eviction_loop_triggered", "L1 eviction ticks that evicted."
        )
        self.alloc_fail = c(
            "lmcache_mp_l1_allocation_failure_chunks",
            "Chunks L1 could not allocate.",
            ("during", "model_name"),
        )
        self.read_fail = c(
            "lmcache_mp_l1_read_failure_chunks",
            "Chunks L1 could not serve.",
            ("during", "reason", "model_name"),
        )
        tag = ("l1_tag",)
        self.lifetime = h(
            "lmcache_mp_l1_chunk_lifetime_seconds", "Sampled chunk lifetime in L1.", tag,
            LIFECYCLE_BUCKETS,
        )  # fmt: skip
        self.idle = h(
            "lmcache_mp_l1_chunk_idle_before_evict_seconds", "Sampled idle time before eviction.",
            tag, LIFECYCLE_BUCKETS,
        )  # fmt: skip
        self.reuse_gap = h(
            "lmcache_mp_l1_chunk_reuse_gap_seconds", "Sampled time between two touches.", tag,
            LIFECYCLE_BUCKETS,
        )  # fmt: skip
        self.evict_reuse = h(
            "lmcache_mp_l1_chunk_evict_reuse_gap_seconds",
            "Sampled time from eviction to the next write (capped at 300 s).", tag,
            LIFECYCLE_BUCKETS,
        )  # fmt: skip
        # lookups
        ml = ("model_name", "cache_salt")
        self.requested = c("lmcache_mp_lookup_requested_tokens", "Tokens looked up.", ml)
        self.hit = c("lmcache_mp_lookup_hit_tokens", "Tokens found.", ml)
        self.hit_l1 = c("lmcache_mp_lookup_hit_l1_tokens", "Tokens found in L1.", ml)
        self.hit_l2 = c("lmcache_mp_lookup_hit_l2_tokens", "Tokens found in L2.", ml)
        self.hit_l1_keys = c("lmcache_mp_lookup_hit_l1_keys", "Keys found in L1.", ml)
        self.hit_l2_keys = c("lmcache_mp_lookup_hit_l2_keys", "Keys found in L2.", ml)
        self.lookups = c("lmcache_mp_lookups_requests", "Lookups.", ml)
        self.early_exit = c(
            "lmcache_mp_lookup_early_exit_requests", "Lookups that exited early.", (*ml, "reason")
        )
        # transfers
        dev = ("device",)
        self.sub_stores = c("lmcache_mp_num_submitted_stores", "Stores submitted.", dev)
        self.fin_stores = c("lmcache_mp_num_finished_stores", "Stores finished.", dev)
        self.sub_retrieves = c("lmcache_mp_num_submitted_retrieves", "Retrieves submitted.", dev)
        self.fin_retrieves = c("lmcache_mp_num_finished_retrieves", "Retrieves finished.", dev)
        tp = ("device", "engine_id", "model_name")
        self.store_tp = h(
            "lmcache_mp_l0_l1_store_throughput_GB_per_second", "Engine → L1 copy throughput.",
            tp, DEFAULT_BUCKETS,
        )  # fmt: skip
        self.load_tp = h(
            "lmcache_mp_l0_l1_load_throughput_GB_per_second", "L1 → engine copy throughput.",
            tp, DEFAULT_BUCKETS,
        )  # fmt: skip
        self.chunks_loaded = c(
            "lmcache_mp_num_chunks_loaded", "Chunks retrieved into engines.",
            ("worker_id", "model_name", "cache_salt"),
        )  # fmt: skip
        self.stored_bytes = c("kvhive_stored_bytes", "Bytes copied from engines into L1.", dev)
        self.retrieved_bytes = c("kvhive_retrieved_bytes", "Bytes copied from L1 to engines.", dev)
        # L2
        self.l2_sub = c("lmcache_mp_l2_store_submitted_requests", "L2 store tasks submitted.")
        self.l2_sub_obj = c(
            "lmcache_mp_l2_store_submitted_objects_chunks", "Chunks submitted to L2.", ("l2_name",)
        )
        self.l2_done = c(
            "lmcache_mp_l2_store_completed_requests", "L2 store tasks completed.", ("l2_name",)
        )
        self.l2_done_obj = c(
            "lmcache_mp_l2_store_completed_objects_chunks", "Chunks stored in L2.", ("l2_name",)
        )
        self.l2_load_done = c(
            "lmcache_mp_l2_load_completed_requests", "L2 load tasks completed.", ("l2_name",)
        )
        self.l2_loaded = c(
            "lmcache_mp_l2_prefetch_load_completed_chunks", "Chunks loaded from L2.", ("l2_name",)
        )
        self.l2_evicted = c("lmcache_mp_l2_evicted_objects_chunks", "Chunks evicted from L2.")
        self.l2_pf_fail = c(
            "lmcache_mp_l2_prefetch_failure_chunks", "Chunks an L2 prefetch could not load.",
            ("reason", "model_name"),
        )  # fmt: skip
        self.l2_failures = c("kvhive_l2_failures", "Failed L2 chunk operations.", ("l2_name", "op"))
        self.pf_timeouts = c("kvhive_prefetch_timeouts", "L2 prefetches that ran out of time.")
        l2tp = ("l2_name",)
        self.l2_store_tp = h(
            "lmcache_mp_l2_store_throughput_GB_per_second", "L1 → L2 throughput.", l2tp,
            DEFAULT_BUCKETS,
        )  # fmt: skip
        self.l2_load_tp = h(
            "lmcache_mp_l2_load_throughput_GB_per_second", "L2 → L1 throughput.", l2tp,
            DEFAULT_BUCKETS,
        )  # fmt: skip
        self.timeouts = c("lmcache_mp_timeouts", "Timeouts raised.", ("exception_type",))
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
        self._tp_start: dict[tuple[str, str], float] = {}

    def _child(self, metric: Any, *values: Any) -> Any:
        """``metric.labels(*values)``, cached: prometheus-client validates and converts the
        labels and takes a lock on every call, several times the cost of the ``inc`` after
        it.  Children are never removed here, so a cached one stays the registered one."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
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
            T.MP_STORE_SUBMITTED: lambda e: self._child(self.sub_stores, e.device).inc(),
            T.MP_RETRIEVE_SUBMITTED: lambda e: self._child(self.sub_retrieves, e.device).inc(),
            T.MP_STORE_END: self._store_end,
            T.MP_RETRIEVE_END: self._retrieve_end,
            T.L2_STORE_SUBMITTED: self._l2_store_submitted,
            T.L2_STORE_COMPLETED: self._l2_store_completed,
            T.L2_LOAD_TASK_SUBMITTED: self._l2_load_submitted,
            T.L2_LOAD_TASK_COMPLETED: self._l2_load_completed,
            T.L2_KEYS_EVICTED: lambda e: self.l2_evicted.inc(e.key_count),
            T.L2_PREFETCH_FAILED: self._l2_prefetch_failed,
            T.TIMEOUT_RAISED: lambda e: self._child(self.timeouts, e.exception_type).inc(),
        }

    # ---- L1 ----------------------------------------------------------------------------------

    def _per_salt(self, counter: Counter, keys: Iterable[ObjectKey], tag: str) -> None:
        for salt, n in ev.salt_counts(list(keys)).items():
            self._child(counter, salt, tag).inc(n)

    def _l1_read(self, e: ev.L1ReadFinished) -> None:
        self._per_salt(self.l1_read, e.keys, e.l1_tag)
        for key in self._gated(e.keys):
            self._touch(key, e.timestamp, e.l1_tag)

    def _l1_write(self, e: ev.L1WriteFinished) -> None:
        self._per_salt(self.l1_write, e.keys, e.l1_tag)
        for key in self._gated(e.keys):
            gone = self._evicted_at.pop(key, None)
            if gone is not None:
                self._child(self.evict_reuse, e.l1_tag).observe(
                    min(e.timestamp - gone, _EVICT_REUSE_CAP_S)
                )
            if len(self._alloc_at) < _TRACK_CAP:
                self._alloc_at[key] = e.timestamp
                self._touch_at[key] = e.timestamp

    def _l1_evicted(self, e: ev.L1KeysEvicted) -> None:
        self._per_salt(self.l1_evicted, e.keys, e.l1_tag)
        for key in self._gated(e.keys):
            born = self._alloc_at.pop(key, None)
            last = self._touch_at.pop(key, None)
            if born is not None:
                self._child(self.lifetime, e.l1_tag).observe(max(0.0, e.timestamp - born))
            if last is not None:
                self._child(self.idle, e.l1_tag).observe(max(0.0, e.timestamp - last))
            if len(self._evicted_at) >= _TRACK_CAP:  # sweep: long waits count as the cap
                for old in list(self._evicted_at)[: _TRACK_CAP // 10]:
                    self._evicted_at.pop(old)
                    self._child(self.evict_reuse, e.l1_tag).observe(_EVICT_REUSE_CAP_S)
            self._evicted_at[key] = e.timestamp

    def _touch(self, key: ObjectKey, now: float, tag: str) -> None:
        last = self._touch_at.get(key)
        if last is not None:
            self._child(self.reuse_gap, tag).observe(max(0.0, now - last))
            self._touch_at[key] = now

    def _gated(self, keys: Iterable[ObjectKey]) -> Iterable[ObjectKey]:
        t = self._threshold
        return [k for k in keys if sampled(k, t)] if t < _GATE_MOD else keys

    def _tick(self, e: ev.L1EvictionTick) -> None:
        self.ticks.inc()
        if e.triggered:
            self.triggered.inc()

    def _alloc_failed(self, e: ev.L1AllocationFailed) -> None:
        self._child(self.alloc_fail, e.during, e.model_name).inc(len(e.keys))

    def _read_failed(self, e: ev.L1ReadFailed) -> None:
        self._child(self.read_fail, e.during, e.reason, e.model_name).inc(len(e.keys))

    # ---- lookups and transfers -----------------------------------------------------------------

    def _lookup_end(self, e: ev.LookupEnd) -> None:
        lab = (e.model_name, e.cache_salt)
        self._child(self.lookups, *lab).inc()
        self._child(self.requested, *lab).inc(e.requested_tokens)
        self._child(self.hit, *lab).inc(e.hit_tokens)
        self._child(self.hit_l1, *lab).inc(e.l1_hit_tokens)
        self._child(self.hit_l2, *lab).inc(e.l2_hit_tokens)
        self._child(self.hit_l1_keys, *lab).inc(e.l1_hit_keys)
        self._child(self.hit_l2_keys, *lab).inc(e.l2_hit_keys)
        if e.early_exit_reason:
            self._child(self.early_exit, *lab, e.early_exit_reason).inc()
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
        self._child(self.fin_stores, e.device).inc()
        self._child(self.stored_bytes, e.device).inc(e.total_bytes)
        self._throughput(self.store_tp, "store", e)

    def _retrieve_end(self, e: ev.RetrieveEnd) -> None:
        self._child(self.fin_retrieves, e.device).inc()
        self._child(self.retrieved_bytes, e.device).inc(e.total_bytes)
        if e.retrieved_count > 0:
            self._child(self.chunks_loaded, str(e.engine_id), e.model_name, e.cache_salt).inc(
                e.retrieved_count
            )
        self._throughput(self.load_tp, "retrieve", e)

    def _throughput(self, hist: Histogram, direction: str, e: Any) -> None:
        if e.total_bytes <= 0 or e.elapsed_seconds <= 0:
            return
        gbps = e.total_bytes / e.elapsed_seconds / 1e9
        self._child(hist, e.device, str(e.engine_id), e.model_name).observe(gbps)
        self.last_copy_gbps[direction] = gbps

    # ---- L2 ----------------------------------------------------------------------------------

    def _l2_store_submitted(self, e: ev.L2StoreSubmitted) -> None:
        self.l2_sub.inc()
        self._child(self.l2_sub_obj, e.l2_name).inc(e.key_count)
        self.inflight_stores[(e.adapter_index, e.task_id)] = (e.l2_name, e.timestamp)

    def _l2_store_completed(self, e: ev.L2StoreCompleted) -> None:
        self._child(self.l2_done, e.l2_name).inc()
        self._child(self.l2_done_obj, e.l2_name).inc(e.succeeded_count)
        if e.failed_count:
            self._child(self.l2_failures, e.l2_name, "store").inc(e.failed_count)
        start = self.inflight_stores.pop((e.adapter_index, e.task_id), None)
        if start is not None and e.bytes_transferred > 0 and e.timestamp > start[1]:
            gbps = e.bytes_transferred / (e.timestamp - start[1]) / 1e9
            self._child(self.l2_store_tp, e.l2_name).observe(gbps)

    def _l2_load_submitted(self, e: ev.L2LoadSubmitted) -> None:
        self.inflight_loads[(e.request_id, e.adapter_index)] = (
            e.l2_name, e.timestamp, e.total_bytes,
        )  # fmt: skip

    def _l2_load_completed(self, e: ev.L2LoadCompleted) -> None:
        self._child(self.l2_load_done, e.l2_name).inc()
        self._child(self.l2_loaded, e.l2_name).inc(e.loaded_count)
        if e.failed_count:
            self._child(self.l2_failures, e.l2_name, "load").inc(e.failed_count)
        adapter = (str(e.adapter_index), e.l2_name)
        self.l2_loaded_by_adapter[adapter] = (
            self.l2_loaded_by_adapter.get(adapter, 0) + e.loaded_count
        )
        start = self.inflight_loads.pop((e.request_id, e.adapter_index), None)
        if start is not None and start[2] > 0 and e.timestamp > start[1]:
            self._child(self.l2_load_tp, e.l2_name).observe(
                start[2] / (e.timestamp - start[1]) / 1e9
            )

    def _l2_prefetch_failed(self, e: ev.L2PrefetchFailed) -> None:
        self._child(self.l2_pf_fail, e.reason, e.model_name).inc(e.key_count)
        if e.reason == "timeout":
            self.pf_timeouts.inc()


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` (for /metrics)."""
    return prometheus_client.generate_latest(registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What generate_latest() writes (the classic text format every Prometheus reads)."""
