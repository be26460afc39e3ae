"""Building observability from the configuration: bus, registry and subscribers.

Start-up order (spec §1.5): :class:`Observability` creates the bus and the subscribers *before* the
storage and engine layers exist, because producers capture the bus when they are built; the
server then :meth:`Observability.attach`-es its live-state readers (for scrape-time gauges) and
calls :meth:`Observability.start`.  Shutdown: :meth:`Observability.stop` flushes the bus,
shuts the subscribers down (closing files, flushing spans) and closes the Prometheus listener.

Exporters (prometheus_client, OpenTelemetry) are imported only inside this package.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from kvhive.config import ServerConfig
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.observability.gauges import StateCollector
from kvhive.observability.logs import LoggingSubscriber
from kvhive.observability.lookup_log import LookupHashLogger
from kvhive.observability.metrics import MetricsSubscriber, Sources, exposition

log = logging.getLogger(__name__)

__all__ = ["DISABLED", "EventBus", "Observability", "Sources"]


class Observability:
    """The bus, the Prometheus registry and the subscribers of one server."""

    def __init__(self, config: ServerConfig) -> None:
        oc = config.observability
        self.config = config
        self.instance_id: str = oc.resolved_instance_id()
        self.bus = EventBus(enabled=oc.bus_enabled, max_queue_size=oc.event_bus_queue_size)
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.metrics: MetricsSubscriber | None = None
        self.tracing: Any = None
        self.lookup_log: LookupHashLogger | None = None
        self._listener: Any = None
        self.prometheus_port: int | None = None
        if oc.metrics_enabled:
            self.metrics = MetricsSubscriber(self.registry, sample_rate=oc.metrics_sample_rate)
            self.bus.register(self.metrics)
        if oc.logging_enabled:
            self.bus.register(LoggingSubscriber())
        if oc.tracing_enabled:
            from kvhive.observability.tracing import TracingSubscriber  # optional extra

            assert oc.otlp_endpoint is not None
            self.tracing = TracingSubscriber(
                endpoint=oc.otlp_endpoint, instance_id=self.instance_id
            )
            self.bus.register(self.tracing)
        lh = config.lookup_hash_log
        if lh.enabled and oc.bus_enabled:
            self.lookup_log = LookupHashLogger(
                lh.dir,
                rotation_interval=lh.rotation_interval,
                rotation_max_size=lh.rotation_max_size,
                max_files=lh.max_files,
            )
            self.bus.register(self.lookup_log)
        elif lh.enabled:
            log.warning("--lookup-hash-log-dir is ignored: --disable-observability is set")

    def attach(self, sources: Sources) -> None:
        """Register the scrape-time collector over the server's live state."""
        if self.metrics is None:
            return
        sources.bus = self.bus
        self.registry.register(
            StateCollector(sources, instance_id=self.instance_id, subscriber=self.metrics)
        )

    def start(self) -> None:
        self.bus.start()
        if self.metrics is not None:
            self._start_listener()

    def _start_listener(self) -> None:
        from prometheus_client import start_http_server

        host = self.config.http.host
        port = self.config.observability.prometheus_port
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.warning(
                "Prometheus listener not started on %s:%d (%s); /metrics stays available on the "
                "HTTP port",
                host,
                port,
                exc,
            )
            return
        self._listener = server
        self.prometheus_port = server.server_port
        log.info("Prometheus /metrics also on http://%s:%d/metrics", host, self.prometheus_port)

    def exposition(self) -> bytes:
        return exposition(self.registry)

    def stop(self) -> None:
        """Flush and stop the bus (subscribers shut down newest first), close the listener."""
        self.bus.stop()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.shutdown()
            listener.server_close()
