"""The event bus: a bounded queue, tail drop, one dispatcher thread, isolated subscribers.

Producers call :meth:`EventBus.publish` on hot paths, so it never blocks and takes no lock:
a disabled bus returns at once (producers guard with ``if bus.enabled`` so they do not even
build the event); a full queue drops the *incoming* event, counts it and warns at most once a
second; otherwise the event is appended to a deque.  The first event after a drain wakes the
dispatcher, which then lingers ``linger_s`` (10 ms) before it drains: one wake-up per batch
instead of one per event, so the dispatcher does not take the GIL from the request loop
between a request and its reply.

One daemon thread named ``EventBus`` drains the queue FIFO and hands each event to every
callback subscribed to its type, in registration order.  Every callback runs on that thread,
so subscriber state needs no lock (gauges read at scrape time on another thread excepted).  A
callback that raises is counted per subscriber and logged (rate limited); the others still get
the event.  Callbacks may publish; those events are handled in the same drain.

``stop()`` wakes and joins the thread, drains what is left, then calls every subscriber's
``shutdown()`` newest first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from kvhive.observability.events import Event, EventType

log = logging.getLogger(__name__)

Callback = Callable[[Any], None]


@runtime_checkable
class Subscriber(Protocol):
    """An object with a fixed set of subscriptions and an optional ``shutdown()``."""

    name: str

    def subscriptions(self) -> Mapping[EventType, Callback]: ...


class EventBus:
    """See the module docstring.  ``enabled=False`` gives an inert bus (no thread)."""

    def __init__(
        self, *, max_queue_size: int, enabled: bool = True, linger_s: float = 0.01
    ) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.enabled = enabled
        self.max_queue_size = max_queue_size
        self.linger_s = linger_s
        self._queue: deque[Event] = deque()
        self._subs: dict[EventType, tuple[tuple[str, Callback], ...]] = {}
        self._owners: list[Any] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self._drops_warned_at = -float("inf")
        self._drops_reported = 0
        self._drop_listeners: list[Callable[[int], None]] = []
        self.exceptions: dict[str, int] = {}
        self._exc_logged_at: dict[str, float] = {}
        self.delivered = 0

    # ---- producers -------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Queue ``event`` for the subscribers; never blocks (see module docstring)."""
        if not self.enabled:
            return
        if len(self._queue) >= self.max_queue_size:
            self._drop()
            return
        self._queue.append(event)
        if not self._wake.is_set():
            self._wake.set()

    def has_subscribers(self, kind: EventType) -> bool:
        """Whether anyone listens to ``kind`` (lets producers skip costly payloads)."""
        return self.enabled and kind in self._subs

    def _drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._drops_warned_at >= 1.0:
            self._drops_warned_at = now
            log.warning(
                "event bus queue full (--event-bus-queue-size %d): dropping events, %d dropped "
                "so far; metrics derived from events under-count",
                self.max_queue_size,
                self.dropped,
            )
        if not self._wake.is_set():
            self._wake.set()

    # ---- subscribers -----------------------------------------------------------------------

    def subscribe(self, kind: EventType, callback: Callback, name: str | None = None) -> None:
        """Call ``callback(event)`` on the dispatcher thread for every event of ``kind``."""
        label = name or _name_of(callback)
        self._subs[kind] = (*self._subs.get(kind, ()), (label, callback))  # copy on write

    def register(self, subscriber: Any) -> None:
        """Subscribe every entry of ``subscriber.subscriptions()``; its ``shutdown()`` (if
        any) runs at :meth:`stop`."""
        name = getattr(subscriber, "name", type(subscriber).__name__)
        for kind, callback in subscriber.subscriptions().items():
            self.subscribe(kind, callback, name)
        self._owners.append(subscriber)

    def on_drops(self, callback: Callable[[int], None]) -> None:
        """``callback(total_dropped)`` after a drain in which the drop count grew."""
        self._drop_listeners.append(callback)

    # ---- dispatcher ------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="EventBus", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._wake.wait(1.0) and self.linger_s > 0:
                self._stop.wait(self.linger_s)  # let the batch fill; stop() cuts it short
            self._wake.clear()
            self.drain()

    def drain(self) -> int:
        """Deliver every queued event (dispatcher thread, or the caller once stopped)."""
        handled = 0
        subs = self._subs
        queue = self._queue
        self._idle.clear()
        try:
            while queue:
                event = queue.popleft()
                handled += 1
                for name, callback in subs.get(event.TYPE, ()):
                    try:
                        callback(event)
                    except Exception as exc:  # noqa: BLE001 - subscriber boundary: isolate, count, log
                        self._failed(name, event, exc)
                if subs is not self._subs:
                    subs = self._subs
        finally:
            self.delivered += handled
            if not queue:
                self._idle.set()
        if self.dropped != self._drops_reported:
            self._drops_reported = self.dropped
            for listener in self._drop_listeners:
                try:
                    listener(self.dropped)
                except Exception as exc:  # noqa: BLE001 - listener boundary, as for subscribers
                    self._failed(_name_of(listener), None, exc)
        return handled

    def _failed(self, name: str, event: Event | None, exc: Exception) -> None:
        self.exceptions[name] = self.exceptions.get(name, 0) + 1
        now = time.monotonic()
        if now - self._exc_logged_at.get(name, -float("inf")) >= 10.0:
            self._exc_logged_at[name] = now
            log.error(
                "event subscriber %s failed on %s (%d failures so far)",
                name,
                event.TYPE.value if event is not None else "drops",
                self.exceptions[name],
                exc_info=exc,
            )

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything published so far has been delivered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue or not self._idle.is_set():
            if self._thread is None or not self._thread.is_alive():
                self.drain()
                return not self._queue
            self._wake.set()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the dispatcher, deliver what is queued, shut subscribers down (newest first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("event bus dispatcher did not stop within %.1f s", timeout)
        if self._thread is None or not self._thread.is_alive():
            self.drain()
        self.enabled = False
        for owner in reversed(self._owners):
            shutdown = getattr(owner, "shutdown", None)
            if shutdown is None:
                continue
            try:
                shutdown()
            except Exception:
                log.exception("shutting down subscriber %s failed", _name_of(owner))
        self._owners.clear()

    # ---- self-monitoring -------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def drain_lag_seconds(self) -> float:
        """Age of the oldest queued event (0 when the queue is empty)."""
        try:
            oldest = self._queue[0]
        except IndexError:
            return 0.0
        return max(0.0, time.time() - oldest.timestamp)

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "running": self.alive,
            "queue_depth": self.queue_depth,
            "max_queue_size": self.max_queue_size,
            "drain_lag_seconds": round(self.drain_lag_seconds(), 6),
            "dropped_events": self.dropped,
            "delivered_events": self.delivered,
            "subscriber_exceptions": dict(self.exceptions),
            "subscriptions": sorted(k.value for k in self._subs),
        }


def _name_of(obj: Any) -> str:
    owner = getattr(obj, "__self__", None)
    if owner is not None:
        return getattr(owner, "name", type(owner).__name__)
    return getattr(obj, "__qualname__", None) or getattr(obj, "name", None) or repr(obj)


DISABLED = EventBus(enabled=False, max_queue_size=1)
"""An inert bus for components built without observability (tests, tools)."""
