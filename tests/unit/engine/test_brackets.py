"""A store or retrieve whose copy raises still ends its telemetry: the end events are
published (failure counted once), the tracing span closes, and the locks go back.

Before the brackets, a raising copy skipped ``store_end``/``retrieve_end``: the span stayed
open until 10,000 newer requests pushed it out, and read failures were undercounted.
"""

from __future__ import annotations

import pytest
from conftest import C, key, register
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvhive.errors import BadRequest
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType
from kvhive.observability.tracing import TracingSubscriber

TOKENS = list(range(1, 4 * C + 1))
BLOCKS = list(range(1, 9))
OUT_OF_RANGE = [10**6] * 8  # the copy backend refuses these mid-request


@pytest.fixture
def traced(engine):
    """The engine publishing to a real bus (drained by hand) with real tracing on it."""
    bus = EventBus(max_queue_size=10000)
    seen: dict[EventType, list] = {}
    for kind in (EventType.MP_STORE_END, EventType.MP_RETRIEVE_END, EventType.L1_READ_FAILED):
        bus.subscribe(kind, seen.setdefault(kind, []).append)
    exporter = InMemorySpanExporter()
    tracing = TracingSubscriber(endpoint="unused", instance_id="test", exporter=exporter)
    bus.register(tracing)
    engine.telemetry.bus = bus
    yield engine, bus, seen, tracing, exporter
    tracing.shutdown()


def test_raising_retrieve_ends_its_span_counts_once_and_returns_locks(traced, make_kv):
    engine, bus, seen, tracing, exporter = traced
    register(engine, make_kv(), 1)
    register(engine, make_kv(), 2)
    engine.transfers.store(key(TOKENS, 0, 4 * C, rid="q"), 1, [BLOCKS], b"")
    engine.lookups.lookup(key(TOKENS, 0, 4 * C, rid="q", worker=None), 1)
    assert engine.lookups.query_prefetch_status("q") == 4
    with pytest.raises(BadRequest, match="block id"):
        engine.transfers.retrieve(key(TOKENS, 0, 4 * C, rid="q"), 2, [OUT_OF_RANGE], b"", 0)
    assert engine.l1.stats().read_locked_objects == 0  # the lookup's lock came back
    assert len(engine.inflight) == 0
    engine.lookups.end_session("q")
    bus.drain()

    (end,) = seen[EventType.MP_RETRIEVE_END]
    assert end.success is False and end.retrieved_count == 0
    assert len(seen[EventType.L1_READ_FAILED]) == 1
    assert engine.counters["retrieve_failures"] == 1
    assert engine.counters["retrieved_chunks"] == 0
    assert tracing.open_spans() == 0  # request root and mp.retrieve child both ended
    tracing.provider.force_flush()
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["mp.lookup_prefetch", "mp.retrieve", "mp.store", "request"]


def test_raising_store_publishes_its_end_and_leaves_nothing_reserved(traced, make_kv):
    engine, bus, seen, tracing, _ = traced
    register(engine, make_kv(), 1)
    with pytest.raises(BadRequest, match="block id"):
        engine.transfers.store(key(TOKENS, 0, 4 * C, rid="s"), 1, [OUT_OF_RANGE], b"")
    assert len(engine.inflight) == 0
    stats = engine.l1.stats()
    assert stats.objects == 0 and stats.staging_objects == 0  # the reservations were aborted
    engine.lookups.end_session("s")
    bus.drain()
    (end,) = seen[EventType.MP_STORE_END]
    assert end.stored_count == 0
    assert engine.counters["stored_chunks"] == 0
    assert tracing.open_spans() == 0
