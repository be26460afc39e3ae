"""Observability: typed events, the event bus and its subscribers.

``events``, ``bus`` and ``health`` are what the other layers import; exporters (Prometheus in
``metrics``, OpenTelemetry in ``tracing``) are imported only by ``setup``, which the server
uses to build everything from the configuration.
"""
