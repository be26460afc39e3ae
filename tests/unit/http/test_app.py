"""The HTTP app against a real (small) KvhiveServer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from kvhive.client import KvhiveClient
from kvhive.http.app import create_app
from kvhive.http.routes.cache import compress_runs
from kvhive.server.core import KvhiveServer
from support.servers import running_server


@pytest.fixture
def server() -> Iterator[KvhiveServer]:
    with running_server() as srv:
        yield srv


@pytest.fixture
def http(server: KvhiveServer) -> TestClient:
    return TestClient(create_app(server))


def test_info_endpoints(http: TestClient, server: KvhiveServer) -> None:
    assert http.get("/").json() == {"status": "ok", "service": "kvhive HTTP API"}
    assert http.get("/healthcheck").json() == {"status": "healthy"}
    assert http.get("/version").json().startswith("0.")
    cfg = http.get("/config").json()
    assert cfg["eviction"]["policy"] == "LRU" and cfg["l1"]["size_gb"] == 0.0625
    st = http.get("/status").json()
    assert st["chunk_size"] == 256 and st["hash_algorithm"] == "blake3"
    assert st["none_hash"].startswith("7e3eff9e")
    assert st["l1"]["configured_bytes"] == 64 << 20 and st["l1"]["objects"] == 0
    assert st["registered_instances"] == {} and st["active_sessions"] == 0


def test_status_counts_real_requests(http: TestClient, server: KvhiveServer) -> None:
    with KvhiveClient(server.zmq.endpoints[0]) as c:
        assert c.call("noop") == "OK"
        c.call("end_session", "x")
    reqs = http.get("/status").json()["requests"]["requests"]
    assert reqs["noop"] == 1 and reqs["end_session"] == 1


def test_cache_clear(http: TestClient) -> None:
    r = http.post("/cache/clear")
    assert r.status_code == 200 and r.json()["cleared"] == {"tier": "l1"}
    assert http.post("/cache/clear", json={"tier": "l1", "force": True}).status_code == 200
    assert http.post("/cache/clear", json={"tier": "l2"}).status_code == 400


def test_checksums_errors(http: TestClient) -> None:
    r = http.post("/cache/checksums", json={"block_ids": [1, 2], "chunk_size": 2, "instance_id": 7})
    assert r.status_code == 404
    assert http.post("/cache/checksums", json={"chunk_size": 2}).status_code == 422


def test_compress_runs() -> None:
    assert compress_runs([1, 2, 3, 4, 5, 9, 10, 11, 12]) == [[1, 5], [9, 12]]
    assert compress_runs([5, 3, 1, 2, 4]) == [5, 3, 1, 2, 4]
    assert compress_runs([1, 2, 3, 4, 5, 7, 8]) == [[1, 5], 7, 8]
    assert compress_runs([]) == []
