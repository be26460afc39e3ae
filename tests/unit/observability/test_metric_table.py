"""The metric table: specs built into prometheus_client metrics by one loop, and the L1
listener-failure counter on the scrape-time path."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.observability.gauges import StateCollector
from kvhive.observability.metric_table import METRICS, MetricSpec, build_metrics
from kvhive.observability.metrics import MetricsSubscriber, Sources
from kvhive.storage.eviction import make_policy
from kvhive.storage.l1 import L1Manager, L1Params

UNIT = 4096


def test_every_spec_is_exposed_with_its_name_type_help_and_labels() -> None:
    reg = CollectorRegistry()
    MetricsSubscriber(reg, sample_rate=1.0)
    text = generate_latest(reg).decode()
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names)) == 41
    for spec in METRICS:
        shown = spec.name + ("_total" if spec.kind == "counter" else "")
        assert f"# HELP {shown} {spec.help}\n# TYPE {shown} {spec.kind}\n" in text
    # the labels and buckets of each spec, read back from the samples
    reg = CollectorRegistry()
    for spec, metric in build_metrics(reg).items():
        child = (
            metric.labels(*[f"v{i}" for i in range(len(spec.labels))]) if spec.labels else metric
        )
        if spec.kind == "histogram":
            child.observe(1.0)
        else:
            child.inc()
    families = {m.name: m for m in reg.collect()}
    for spec in METRICS:
        samples = families[spec.name].samples
        assert all(tuple(k for k in s.labels if k != "le") == spec.labels for s in samples)
        if spec.kind == "histogram":
            bounds = [s.labels["le"] for s in samples if s.name.endswith("_bucket")]
            assert bounds == [*(str(float(b)) for b in spec.buckets), "+Inf"]


def test_a_spec_must_end_with_its_unit_and_only_histograms_have_buckets() -> None:
    with pytest.raises(ValueError):
        MetricSpec("kvhive_stored", "counter", "x", unit="bytes")
    with pytest.raises(ValueError):
        MetricSpec("kvhive_x_seconds", "counter", "x", buckets=(1.0,), unit="seconds")
    with pytest.raises(ValueError):
        MetricSpec("kvhive_x_seconds", "histogram", "x", unit="seconds")


def test_l1_listener_failures_reach_status_and_metrics() -> None:
    l1 = L1Manager(
        L1Params(size_bytes=16 * UNIT, align_bytes=UNIT, lazy=False, init_bytes=0,
                 write_ttl=600.0, read_ttl=300.0, watermark=0.8, eviction_ratio=0.2,
                 shm_name=""),
        policy=make_policy("LRU"),
    )  # fmt: skip

    def feed(_event: str, _keys: list[ObjectKey]) -> None:
        raise RuntimeError("write-behind feed bug")

    l1.add_listener(feed)
    reg = CollectorRegistry()
    reg.register(StateCollector(Sources(l1_stats=lambda: l1.stats().to_dict()),
                                instance_id="i", subscriber=None))  # fmt: skip
    try:
        assert "kvhive_l1_listener_failures_total 0.0" in generate_latest(reg).decode()
        key = ObjectKey(b"\x01" * 8, "m", pack_kv_rank(1, 0), 0, "")
        (slot,) = l1.reserve([key], UNIT, "writer")
        assert slot is not None and l1.commit([slot]) == [True]  # the listener raises
        assert l1.stats().listener_failures == 1
        assert "kvhive_l1_listener_failures_total 1.0" in generate_latest(reg).decode()
    finally:
        l1.close()
