"""OTLP/gRPC tracing (``--enable-tracing --otlp-endpoint URL``; needs the ``tracing`` extra).

Spans follow the reference's MP-server tracer (``lmcache_mp.server``):

* a root ``request`` per session (attribute ``session_id``), opened by ``mp.request.start`` or
  lazily by the first child (store-only requests);
* children ``mp.lookup_prefetch``, ``mp.store`` and ``mp.retrieve`` from the matching start to
  end event; every payload field becomes a string attribute;
* on ``mp.lookup_prefetch.end`` the root gets typed ``hit_tokens``, ``requested_tokens``,
  ``hit_rate``, ``l1_hit_tokens``, ``l2_hit_tokens``, ``l1_hit_rate``, ``l2_hit_rate``,
  ``l1_hit_keys``, ``l2_hit_keys`` and ``early_exit_reason``;
* ``mp.request.end`` closes the root unless stores/retrieves of the session are still open;
  then the last of them closes it with its own timestamp.  Shutdown ends every open span.

Span times come from event timestamps.  The resource carries ``service.instance.id``.
OpenTelemetry is imported only here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from kvhive.observability import events as ev
from kvhive.observability.events import EventType

log = logging.getLogger(__name__)

MAX_OPEN_REQUESTS = 10_000
"""Roots kept open at most; beyond, the oldest is ended (a client that never ends sessions)."""

_ROOT_TYPED = (
    "hit_tokens",
    "requested_tokens",
    "l1_hit_tokens",
    "l2_hit_tokens",
    "l1_hit_keys",
    "l2_hit_keys",
)


def _ns(ts: float) -> int:
    return int(ts * 1e9)


def _attrs(e: ev.Event) -> dict[str, str]:
    out = {k: str(v) for k, v in e.metadata().items()}
    out["session_id"] = e.session_id
    return out


class _Root:
    __slots__ = ("span", "open_children", "end_at")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.open_children = 0
        self.end_at: float | None = None


class TracingSubscriber:
    """Turns MP-server events into spans (all callbacks on the bus thread)."""

    name = "tracing"

    def __init__(
        self, *, endpoint: str, instance_id: str, exporter: SpanExporter | None = None
    ) -> None:
        resource = Resource.create({"service.instance.id": instance_id})
        self.provider = TracerProvider(resource=resource)
        self.exporter = exporter or OTLPSpanExporter(endpoint=endpoint, insecure=True)
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("lmcache_mp.server")
        self._roots: OrderedDict[str, _Root] = OrderedDict()
        self._children: dict[tuple[str, str, str], Any] = {}

    def subscriptions(self) -> Mapping[EventType, Callable[[Any], None]]:
        T = EventType
        return {
            T.MP_REQUEST_START: self._request_start,
            T.MP_REQUEST_END: self._request_end,
            T.MP_LOOKUP_PREFETCH_START: lambda e: self._open(e, "mp.lookup_prefetch", ""),
            T.MP_LOOKUP_PREFETCH_END: self._lookup_end,
            T.MP_STORE_START: lambda e: self._open(e, "mp.store", e.transfer_key),
            T.MP_STORE_END: lambda e: self._close(e, "mp.store", e.transfer_key),
            T.MP_RETRIEVE_START: lambda e: self._open(e, "mp.retrieve", e.transfer_key),
            T.MP_RETRIEVE_END: lambda e: self._close(e, "mp.retrieve", e.transfer_key),
        }

    # ---- roots -----------------------------------------------------------------------------

    def _root(self, e: ev.Event) -> _Root:
        root = self._roots.get(e.session_id)
        if root is None:
            span = self.tracer.start_span(
                "request", start_time=_ns(e.timestamp), attributes={"session_id": e.session_id}
            )
            root = self._roots[e.session_id] = _Root(span)
            if len(self._roots) > MAX_OPEN_REQUESTS:
                sid, old = self._roots.popitem(last=False)
                self._end_root(sid, old, e.timestamp)
        return root

    def _request_start(self, e: ev.RequestStart) -> None:
        self._root(e)

    def _request_end(self, e: ev.RequestEnd) -> None:
        root = self._roots.get(e.session_id)
        if root is None:
            return
        if root.open_children:
            root.end_at = e.timestamp  # the last child closes it
        else:
            del self._roots[e.session_id]
            self._end_root(e.session_id, root, e.timestamp)

    def _end_root(self, sid: str, root: _Root, ts: float) -> None:
        for key in [k for k in self._children if k[0] == sid]:
            self._children.pop(key).end(end_time=_ns(ts))
        root.span.end(end_time=_ns(ts))

    # ---- children --------------------------------------------------------------------------

    def _open(self, e: ev.Event, name: str, tag: str) -> None:
        root = self._root(e)
        ctx = trace.set_span_in_context(root.span)
        span = self.tracer.start_span(
            name, context=ctx, start_time=_ns(e.timestamp), attributes=_attrs(e)
        )
        old = self._children.pop((e.session_id, name, tag), None)
        if old is not None:
            old.end(end_time=_ns(e.timestamp))
        else:
            root.open_children += 1
        self._children[(e.session_id, name, tag)] = span

    def _close(self, e: ev.Event, name: str, tag: str) -> None:
        span = self._children.pop((e.session_id, name, tag), None)
        if span is None:
            return
        span.set_attributes(_attrs(e))
        span.end(end_time=_ns(e.timestamp))
        root = self._roots.get(e.session_id)
        if root is None:
            return
        root.open_children -= 1
        if root.open_children <= 0 and root.end_at is not None:
            del self._roots[e.session_id]
            self._end_root(e.session_id, root, e.timestamp)

    def _lookup_end(self, e: ev.LookupEnd) -> None:
        root = self._roots.get(e.session_id)
        if root is not None:
            req = e.requested_tokens
            attrs: dict[str, Any] = {k: getattr(e, k) for k in _ROOT_TYPED}
            attrs["hit_rate"] = e.hit_tokens / req if req else 0.0
            attrs["l1_hit_rate"] = e.l1_hit_tokens / req if req else 0.0
            attrs["l2_hit_rate"] = e.l2_hit_tokens / req if req else 0.0
            attrs["early_exit_reason"] = e.early_exit_reason
            root.span.set_attributes(attrs)
        self._close(e, "mp.lookup_prefetch", "")

    # ---- lifecycle ---------------------------------------------------------------------------

    def open_spans(self) -> int:
        return len(self._roots) + len(self._children)

    def shutdown(self) -> None:
        """End every open span and flush the exporter (called by the bus at stop)."""
        now = time.time()
        for sid, root in list(self._roots.items()):
            self._end_root(sid, root, now)
        self._roots.clear()
        self._children.clear()
        try:
            self.provider.force_flush(timeout_millis=5000)
        finally:
            self.provider.shutdown()
