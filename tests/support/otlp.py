"""A minimal OTLP/gRPC trace collector for tests: keeps every exported span with its resource.

Needs grpcio and opentelemetry-proto (the tracing extra); callers import this module only
after checking that (see tests/unit/observability/test_tracing.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_service
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc


class Receiver(trace_grpc.TraceServiceServicer):
    """Collected spans as ``(resource attributes, span)``; ``endpoint`` once listening."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, object]] = []
        self.got = threading.Condition()
        self.endpoint = ""

    def Export(self, request, context):  # the gRPC method name
        with self.got:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append((resource, span))
            self.got.notify_all()
        return trace_service.ExportTraceServiceResponse()

    def names(self) -> set[str]:
        with self.got:
            return {s.name for _, s in self.spans}

    def wait_for(self, names: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self.got:
            while not names <= {s.name for _, s in self.spans}:
                left = deadline - time.monotonic()
                assert left > 0, (
                    f"spans {names} not received; got {[s.name for _, s in self.spans]}"
                )
                self.got.wait(left)


@contextmanager
def otlp_receiver(address: str) -> Iterator[Receiver]:
    """A receiver listening on ``address`` (``host:port``), stopped at exit."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rec = Receiver()
    trace_grpc.add_TraceServiceServicer_to_server(rec, server)
    server.add_insecure_port(address)
    server.start()
    rec.endpoint = f"http://{address}"
    try:
        yield rec
    finally:
        server.stop(grace=None)
