"""OTLP tracing against a real OTLP/gRPC receiver started by the test.

Skips only when the tracing extra (opentelemetry-sdk, the OTLP gRPC exporter, grpcio) is not
installed and KVHIVE_REQUIRE_SERVICES is unset; CI sets it, so a missing package fails there.
"""

from __future__ import annotations

import os

import pytest

from kvhive.cli.main import main
from kvhive.observability import events as ev
from support.net import free_port
from support.traffic import C, Traffic, running_server, shm_kv


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if os.environ.get("KVHIVE_REQUIRE_SERVICES"):
            raise
        pytest.skip(f"{module} is not installed (pip install 'kvhive[tracing]')")


_require("grpc")
_require("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
_require("opentelemetry.sdk.trace")
_require("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")


@pytest.fixture
def receiver():
    from support.otlp import otlp_receiver

    with otlp_receiver(f"127.0.0.1:{free_port()}") as rec:
        yield rec


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = getattr(v, v.WhichOneof("value"))
    return out


def test_spans_reach_the_otlp_receiver_with_the_instance_id(receiver) -> None:
    args = ("--enable-tracing", "--otlp-endpoint", receiver.endpoint,
            "--service-instance-id", "trace-me")  # fmt: skip
    with running_server(*args) as server, shm_kv() as kv:
        traffic = Traffic(server, kv)
        try:
            assert traffic.round(2, "req-1") == 2
        finally:
            traffic.close()
    # close() stopped the bus: spans ended and flushed to the receiver
    receiver.wait_for({"request", "mp.lookup_prefetch", "mp.store", "mp.retrieve"})
    spans = {s.name: (res, s) for res, s in receiver.spans}
    for res, _ in spans.values():
        assert res["service.instance.id"] == "trace-me"
    root = spans["request"][1]
    for child in ("mp.lookup_prefetch", "mp.store", "mp.retrieve"):
        span = spans[child][1]
        assert span.trace_id == root.trace_id and span.parent_span_id == root.span_id
        assert attrs(span)["session_id"] == "req-1"
        assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano
    ra = attrs(root)
    assert ra["session_id"] == "req-1"
    assert ra["hit_tokens"] == 2 * C and ra["requested_tokens"] == 2 * C
    assert ra["l1_hit_rate"] == 1.0 and ra["hit_rate"] == 1.0
    assert attrs(spans["mp.store"][1])["stored_count"] == "2"


def test_an_explicit_empty_instance_id_is_kept(receiver) -> None:
    args = ("--enable-tracing", "--otlp-endpoint", receiver.endpoint, "--service-instance-id", "")
    with running_server(*args) as server:
        assert server.obs.instance_id == ""
        server.obs.bus.publish(ev.RequestStart(session_id="x"))
        server.obs.bus.publish(ev.RequestEnd(session_id="x"))
    receiver.wait_for({"request"})
    assert [res.get("service.instance.id") for res, _ in receiver.spans] == [""]
    with running_server() as server:
        assert len(server.obs.instance_id) == 36  # a fresh UUID4 by default


def test_tracing_without_endpoint_exits_2(capsys) -> None:
    rc = main(["server", "--l1-size-gb", "0.01", "--eviction-policy", "LRU", "--enable-tracing"])
    assert rc == 2
    assert "--enable-tracing requires --otlp-endpoint" in capsys.readouterr().err
