"""Scrape-time metrics: gauges read from live state, exact engine counters, target_info.

Called by prometheus_client on the scraping thread (the HTTP app or the ``--prometheus-port``
listener).  Values come from :class:`~kvhive.observability.metrics.Sources` and from the
state the :class:`~kvhive.observability.metrics.MetricsSubscriber` keeps on the bus thread
(plain dict/deque reads, copied before iterating).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvhive import __version__
from kvhive.observability.bus import EventBus
from kvhive.observability.metrics import MetricsSubscriber, Sources


class StateCollector(Collector):
    """Scrape-time gauges and exact engine counters (see module docstring)."""

    def __init__(
        self, sources: Sources, *, instance_id: str, subscriber: MetricsSubscriber | None
    ) -> None:
        self.sources = sources
        self.instance_id = instance_id
        self.sub = subscriber

    def collect(self) -> Iterable[Metric]:
        s = self.sources
        info = GaugeMetricFamily(
            "target_info", "Target metadata", labels=["service_instance_id", "service_name",
            "service_version"],
        )  # fmt: skip
        info.add_metric([self.instance_id, "kvhive", __version__], 1)
        yield info
        yield from self._l1(s.l1_stats())
        yield _gauge(
            "lmcache_mp_active_prefetch_jobs", "Lookups in flight.", s.active_prefetch_jobs()
        )
        yield _gauge("kvhive_active_sessions", "Request sessions.", s.active_sessions())
        yield _gauge(
            "kvhive_registered_instances", "Registered engine workers.", s.registered_instances()
        )
        counters = s.engine_counters()
        for name, value in sorted(counters.items()):
            fam = CounterMetricFamily(
                f"kvhive_engine_{name}", f"Engine counter {name} (exact, bus independent)."
            )
            fam.add_metric([], value)
            yield fam
        yield from _l2_health(s.l2_health())
        if s.bus is not None:
            yield from _bus_metrics(s.bus)
        if self.sub is not None:
            yield from self._tiers(self.sub)
            yield from self._l2(self.sub)
            copy = GaugeMetricFamily(
                "kvhive_copy_throughput_GB_per_second", "Throughput of the latest copy.",
                labels=["direction"],
            )  # fmt: skip
            for direction, gbps in sorted(self.sub.last_copy_gbps.items()):
                copy.add_metric([direction], gbps)
            yield copy
        for extra in s.extra:
            yield from extra()

    def _l1(self, st: Mapping[str, Any]) -> Iterable[Metric]:
        lab = ["l1_tag", "backend"]
        vals = ["_default", "dram"]
        for name, doc, value in (
            ("lmcache_mp_l1_memory_usage_bytes", "L1 bytes in use.", st.get("used_bytes", 0)),
            ("lmcache_mp_l1_usage_ratio", "L1 used / configured.", st.get("usage", 0.0)),
            (
                "lmcache_mp_l1_staging_bytes",
                "L1 bytes reserved for writes.",
                st.get("staging_bytes", 0),
            ),
            ("kvhive_l1_capacity_bytes", "Configured L1 bytes.", st.get("configured_bytes", 0)),
        ):
            g = GaugeMetricFamily(name, doc, labels=lab)
            g.add_metric(vals, value)
            yield g
        yield _gauge("kvhive_l1_objects", "Resident L1 objects.", st.get("objects", 0))
        yield _gauge(
            "kvhive_l1_read_locked_objects", "L1 objects holding read locks.",
            st.get("read_locked_objects", 0),
        )  # fmt: skip
        yield _gauge(
            "kvhive_l1_write_reserved_objects", "L1 objects reserved for writing (write locks).",
            st.get("staging_objects", 0),
        )  # fmt: skip
        dropped = CounterMetricFamily("kvhive_l1_dropped_store_chunks", "Stores refused: L1 full.")
        dropped.add_metric([], st.get("dropped_oom", 0))
        yield dropped
        failed = CounterMetricFamily(
            "kvhive_l1_listener_failures",
            "L1 event listener calls (the write-behind feed) that raised.",
        )
        failed.add_metric([], st.get("listener_failures", 0))
        yield failed

    def _tiers(self, sub: MetricsSubscriber) -> Iterable[Metric]:
        t = dict(sub.lookup_tokens)
        req = t["requested"]
        ratio = GaugeMetricFamily(
            "kvhive_tier_hit_ratio",
            "Share of looked-up tokens served by a tier since start (l2 per adapter: share of "
            "the L2 hits it loaded).",
            labels=["tier", "adapter"],
        )
        ratio.add_metric(["l1", ""], t["l1"] / req if req else 0.0)
        l2 = t["l2"] / req if req else 0.0
        ratio.add_metric(["l2", ""], l2)
        loaded = dict(sub.l2_loaded_by_adapter)
        total = sum(loaded.values())
        for (index, name), n in sorted(loaded.items()):
            ratio.add_metric(["l2", f"{index}:{name}"], l2 * n / total if total else 0.0)
        yield ratio
        hits = CounterMetricFamily(
            "kvhive_tier_hit_tokens", "Looked-up tokens served per tier.", labels=["tier"]
        )
        hits.add_metric(["l1"], t["l1"])
        hits.add_metric(["l2"], t["l2"])
        hits.add_metric(["miss"], max(0, req - t["l1"] - t["l2"]))
        yield hits

    def _l2(self, sub: MetricsSubscriber) -> Iterable[Metric]:
        labels = ["l2_name", "adapter_index"]
        for name, doc, table in (
            ("lmcache_mp_num_inflight_l2_stores", "L2 store tasks in flight.", sub.inflight_stores),
            ("lmcache_mp_num_inflight_l2_loads", "L2 load tasks in flight.", sub.inflight_loads),
        ):
            counts: dict[tuple[str, str], int] = {}
            for (a, b), value in list(table.items()):
                adapter = a if table is sub.inflight_stores else b
                key = (str(value[0]), str(adapter))
                counts[key] = counts.get(key, 0) + 1
            g = GaugeMetricFamily(name, doc, labels=labels)
            for key, n in sorted(counts.items()):
                g.add_metric(list(key), n)
            yield g


def _l2_health(tiers: Iterable[tuple[str, int, Any]]) -> Iterable[Metric]:
    labels = ["l2_name", "adapter_index"]
    up = GaugeMetricFamily(
        "kvhive_l2_adapter_up",
        "1 while the L2 adapter answers its tasks, 0 after several "
        "failed in a row (the node serves from L1 and the other tiers meanwhile).",
        labels=labels,
    )
    failing = GaugeMetricFamily(
        "kvhive_l2_adapter_consecutive_failures", "L2 tasks failed in a row.", labels=labels
    )
    failures = CounterMetricFamily(
        "kvhive_l2_adapter_task_failures", "L2 tasks that failed (raised, timed out, or "
        "every key an error).", labels=labels)  # fmt: skip
    for name, index, snap in tiers:
        key = [name, str(index)]
        up.add_metric(key, 1 if snap.available else 0)
        failing.add_metric(key, snap.consecutive_failures)
        failures.add_metric(key, snap.failures)
    yield up
    yield failing
    yield failures


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _bus_metrics(bus: EventBus) -> Iterable[Metric]:
    yield _gauge("lmcache_mp_event_bus_queue_depth", "Events waiting.", bus.queue_depth)
    yield _gauge(
        "lmcache_mp_event_bus_drain_lag_seconds", "Age of the oldest queued event.",
        bus.drain_lag_seconds(),
    )  # fmt: skip
    dropped = CounterMetricFamily("lmcache_mp_event_bus_dropped_events", "Events tail-dropped.")
    dropped.add_metric([], bus.dropped)
    yield dropped
    exc = CounterMetricFamily(
        "lmcache_mp_event_bus_subscriber_exceptions", "Subscriber failures.",
        labels=["subscriber_name"],
    )  # fmt: skip
    for name, n in sorted(bus.exceptions.items()):
        exc.add_metric([name], n)
    yield exc
