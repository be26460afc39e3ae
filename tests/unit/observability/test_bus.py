"""The event bus: order, tail drop with counting and rate-limited warnings, isolation, stop."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType


def end(n: int = 0) -> ev.RequestEnd:
    return ev.RequestEnd(session_id=f"s{n}")


def test_events_are_frozen_slotted_and_typed() -> None:
    e = ev.StoreEnd(session_id="r", stored_count=2, total_bytes=10, num_tokens=64)
    assert e.type is EventType.MP_STORE_END and e.type.value == "mp.store.end"
    assert e.metadata()["stored_count"] == 2 and "timestamp" not in e.metadata()
    with pytest.raises(AttributeError):
        e.stored_count = 3  # type: ignore[misc]
    assert not hasattr(e, "__dict__")


def test_delivery_in_order_on_the_dispatcher_thread() -> None:
    bus = EventBus(max_queue_size=100)
    seen: list[tuple[str, str]] = []
    bus.subscribe(
        EventType.MP_REQUEST_END,
        lambda e: seen.append((e.session_id, threading.current_thread().name)),
    )
    bus.start()
    for i in range(50):
        bus.publish(end(i))
    assert bus.flush()
    assert [s for s, _ in seen] == [f"s{i}" for i in range(50)]
    assert {t for _, t in seen} == {"EventBus"}
    assert bus.has_subscribers(EventType.MP_REQUEST_END)
    assert not bus.has_subscribers(EventType.MP_LOOKUP)
    bus.stop()


def test_overflow_tail_drops_counts_and_warns_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(max_queue_size=5)  # not started: the queue only fills
    got: list[str] = []
    bus.subscribe(EventType.MP_REQUEST_END, lambda e: got.append(e.session_id))
    drops: list[int] = []
    bus.on_drops(drops.append)
    with caplog.at_level(logging.WARNING, logger="kvhive.observability.bus"):
        t0 = time.perf_counter()
        for i in range(1005):
            bus.publish(end(i))
        elapsed = time.perf_counter() - t0
    assert bus.queue_depth == 5 and bus.dropped == 1000
    warnings = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(warnings) == 1 and "--event-bus-queue-size 5" in warnings[0].getMessage()
    assert elapsed < 1.0  # never blocks
    assert bus.drain_lag_seconds() >= 0
    bus.drain()
    assert got == [f"s{i}" for i in range(5)]  # the oldest were kept: tail drop
    assert drops == [1000]


def test_a_failing_subscriber_is_isolated(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(max_queue_size=10000)
    good: list[str] = []

    class Broken:
        name = "broken"

        def subscriptions(self):
            return {EventType.MP_REQUEST_END: self.boom}

        def boom(self, e):
            raise RuntimeError("kaput")

    bus.register(Broken())
    bus.subscribe(EventType.MP_REQUEST_END, lambda e: good.append(e.session_id), name="good")
    bus.start()
    for i in range(3):
        bus.publish(end(i))
    assert bus.flush()
    assert good == ["s0", "s1", "s2"]
    assert bus.exceptions == {"broken": 3}
    assert sum("event subscriber broken failed" in r.getMessage() for r in caplog.records) == 1
    assert bus.stats()["subscriber_exceptions"] == {"broken": 3}
    bus.stop()


def test_callbacks_may_publish_and_stop_drains_then_shuts_down_newest_first() -> None:
    bus = EventBus(max_queue_size=10000)
    order: list[str] = []

    class Sub:
        def __init__(self, name: str) -> None:
            self.name = name

        def subscriptions(self):
            return {EventType.MP_REQUEST_END: self.on_end}

        def on_end(self, e):
            order.append(f"{self.name}:{e.session_id}")
            if e.session_id == "s0" and self.name == "a":
                bus.publish(end(1))

        def shutdown(self):
            order.append(f"shutdown {self.name}")

    bus.register(Sub("a"))
    bus.register(Sub("b"))
    bus.publish(end(0))  # queued before start; stop() delivers it
    bus.start()
    bus.stop()
    assert order == ["a:s0", "b:s0", "a:s1", "b:s1", "shutdown b", "shutdown a"]
    assert not bus.alive
    bus.publish(end(9))  # after stop: ignored
    assert bus.queue_depth == 0


def test_disabled_bus_has_no_thread_and_ignores_events() -> None:
    bus = EventBus(enabled=False, max_queue_size=1)
    bus.subscribe(EventType.MP_REQUEST_END, lambda e: None)
    bus.start()
    bus.publish(end())
    assert not bus.alive and bus.queue_depth == 0 and bus.dropped == 0
    assert not bus.has_subscribers(EventType.MP_REQUEST_END)


def test_bad_queue_size() -> None:
    with pytest.raises(ValueError):
        EventBus(max_queue_size=0)


def test_dispatcher_lingers_after_the_first_event_then_drains_the_batch() -> None:
    bus = EventBus(max_queue_size=100, linger_s=0.3)
    seen: list[str] = []
    bus.subscribe(EventType.MP_REQUEST_END, lambda e: seen.append(e.session_id))
    bus.start()
    t0 = time.monotonic()
    bus.publish(end(0))
    time.sleep(0.1)
    assert seen == []  # lingering: one event does not pull the dispatcher onto the GIL
    for i in range(1, 5):
        bus.publish(end(i))
    while len(seen) < 5 and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert seen == [f"s{i}" for i in range(5)] and bus.delivered == 5
    assert time.monotonic() - t0 >= 0.25
    bus.publish(end(5))
    t1 = time.monotonic()
    bus.stop()  # cuts the linger short and still delivers
    assert seen[-1] == "s5" and time.monotonic() - t1 < 0.25
