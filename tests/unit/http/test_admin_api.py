"""Every admin endpoint's shape and errors: info, config, metrics, loglevel, cache objects,
token protection, health reflecting a stuck copy, dashboard, OpenAPI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from kvhive import __version__
from kvhive.http.app import create_app
from kvhive.server.core import KvhiveServer
from support.traffic import C, Traffic, running_server, shm_kv

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server() -> Iterator[KvhiveServer]:
    with running_server("--http-api-token", TOKEN, "--service-instance-id", "api-1") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: KvhiveServer) -> TestClient:
    return TestClient(create_app(server))


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_info_shapes(http: TestClient) -> None:
    assert http.get("/").json() == {"status": "ok", "service": "kvhive HTTP API"}
    assert http.get("/healthcheck").json() == {"status": "healthy"}
    assert http.get("/version").json() == f"{__version__}-NA"
    assert http.get("/lmc_version").json() == __version__
    assert http.get("/commit_id").json() == "NA"
    st = http.get("/status").json()
    for field in ("is_healthy", "engine_type", "chunk_size", "hash_algorithm", "active_sessions"):
        assert field in st
    assert st["is_healthy"] is True and st["service_instance_id"] == "api-1"
    assert st["event_bus"]["enabled"] and st["runtime_plugins"] == []
    l1 = st["storage_manager"]["l1_manager"]  # what `lmcache describe kvcache` reads
    assert l1["memory_total_bytes"] == 64 << 20 and l1["total_object_count"] == 0
    assert 0 <= l1["memory_usage_ratio"] <= 1 and st["cache_context_meta"] == {}


def test_config_is_indented_json_with_the_token_masked(http: TestClient) -> None:
    resp = http.get("/config")
    assert resp.status_code == 200 and resp.text.startswith("{\n  ")
    cfg = json.loads(resp.text)
    assert cfg["http_admin"]["api_token"] == "***"
    assert TOKEN not in resp.text
    assert cfg["observability"]["service_instance_id"] == "api-1"
    assert cfg["observability"]["event_bus_queue_size"] == 10000
    assert cfg["lookup_hash_log"]["max_files"] == 100


def test_metrics_endpoint(http: TestClient) -> None:
    resp = http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'target_info{service_instance_id="api-1"' in resp.text


def test_no_code_execution_or_environment_dump(http: TestClient) -> None:
    assert http.post("/run_script", headers=AUTH).status_code in (404, 405)
    assert http.get("/env").status_code == 404
    paths = http.get("/openapi.json").json()["paths"]
    assert not {"/run_script", "/env"} & set(paths)
    for path in ("/healthcheck", "/status", "/metrics", "/cache/objects", "/loglevel", "/config"):
        assert path in paths
    assert http.get("/docs").status_code == 200 and http.get("/redoc").status_code == 200


def test_mutations_need_the_token(http: TestClient) -> None:
    r = http.post("/cache/clear")
    assert r.status_code == 401 and "http-api-token" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert http.post("/cache/clear", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert http.post("/cache/clear", headers=AUTH).json()["status"] == "ok"
    assert http.post("/cache/clear", headers={"X-API-Token": TOKEN}).status_code == 200
    body = {"keys": [], "tier": "l1"}
    assert http.request("DELETE", "/cache/objects", json=body).status_code == 401
    assert http.get("/loglevel", params={"logger_name": "x", "level": "INFO"}).status_code == 401
    # reads stay open
    assert http.get("/status").status_code == 200 and http.get("/loglevel").status_code == 200


def test_loglevel(http: TestClient) -> None:
    text = http.get("/loglevel").text
    assert text.startswith("root: ") and "\nkvhive.engine.engine: " in text
    assert (
        http.get("/loglevel", params={"logger_name": "kvhive.test"}).text == "kvhive.test: NOTSET\n"
    )
    r = http.get("/loglevel", params={"logger_name": "kvhive.test", "level": "debug"}, headers=AUTH)
    assert r.status_code == 200 and r.text == "kvhive.test: DEBUG\n"
    assert logging.getLogger("kvhive.test").level == logging.DEBUG
    bad = http.get(
        "/loglevel", params={"logger_name": "kvhive.test", "level": "LOUD"}, headers=AUTH
    )
    assert bad.status_code == 400 and "unknown level" in bad.json()["detail"]


def test_cache_objects_l1_listing_paging_and_delete(server: KvhiveServer, http: TestClient) -> None:
    with shm_kv() as kv:
        traffic = Traffic(server, kv, instance_id=5)
        try:
            traffic.store(list(range(1, 1 + 3 * C)), "objs", [1, 2, 3, 4, 5, 6])
            traffic.end("objs")
        finally:
            traffic.close()
        page = http.get("/cache/objects", params={"tier": "l1", "page_size": 2}).json()
        assert page["adapter"] == "l1" and page["shared"] is False
        assert len(page["entries"]) == 2 and page["next_page_token"]
        key = page["entries"][0]["key"]
        assert set(key) == {
            "chunk_hash_hex",
            "model_name",
            "kv_rank",
            "object_group_id",
            "cache_salt",
        }
        assert page["entries"][0]["size_bytes"] == 6144
        rest = http.get(
            "/cache/objects", params={"tier": "l1", "page_token": page["next_page_token"]}
        ).json()
        assert len(rest["entries"]) == 1 and rest["next_page_token"] is None
        none = http.get("/cache/objects", params={"tier": "l1", "model_name": "other"}).json()
        assert none["entries"] == []
        gone = http.request(
            "DELETE", "/cache/objects", json={"keys": [key], "tier": "l1"}, headers=AUTH
        ).json()
        assert gone == {"deleted": 1, "skipped": 0, "ok": True}
        assert server.l1.stats().objects == 2
        http.post("/cache/clear", headers=AUTH)


def test_cache_objects_errors(http: TestClient) -> None:
    assert http.get("/cache/objects").status_code == 503  # default tier l2, no adapters
    assert http.get("/cache/objects", params={"tier": "l3"}).status_code == 400
    assert http.get("/cache/objects", params={"tier": "l1", "page_token": "%%"}).status_code == 400
    assert http.get("/cache/objects", params={"page_size": 0}).status_code == 422
    bad = {"keys": [{"chunk_hash_hex": "zz", "model_name": "m", "kv_rank": 0}], "tier": "l1"}
    r = http.request("DELETE", "/cache/objects", json=bad, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"].startswith("keys[0].chunk_hash_hex:")
    many = {"keys": [{"chunk_hash_hex": "00", "model_name": "m", "kv_rank": 0}] * 10001}
    r = http.request("DELETE", "/cache/objects", json=many, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"].startswith("keys:")
    r = http.request("DELETE", "/cache/objects", json={"keys": []}, headers=AUTH)
    assert r.status_code == 503  # tier l2 without adapters
    r = http.request("DELETE", "/cache/objects", json={"keys": [], "tier": "all"}, headers=AUTH)
    assert r.json() == {"deleted": 0, "skipped": 0, "ok": True}


def test_healthcheck_reports_a_stuck_copy(server: KvhiveServer, http: TestClient) -> None:
    token = server.inflight.begin("retrieve", "req-stuck")
    try:
        server.inflight.deadline = 0.0  # any running copy is now past its deadline
        r = http.get("/healthcheck")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unhealthy" and "retrieve req-stuck running" in body["reason"]
        assert http.get("/status").json()["is_healthy"] is False
    finally:
        server.inflight.end(token)
        server.inflight.deadline = 60.0
    assert http.get("/healthcheck").status_code == 200


def test_dashboard_page_assets_and_data(http: TestClient) -> None:
    page = http.get("/dashboard")
    assert page.status_code == 200 and "<title>kvhive dashboard</title>" in page.text
    assert (
        http.get("/dashboard/static/dashboard.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert http.get("/dashboard/static/nope.js").status_code == 404
    data = http.get("/dashboard/data").json()
    assert data["service_instance_id"] == "api-1" and data["healthy"] is True
    assert {"l1", "lookup_tokens", "l2_adapters", "engines", "event_bus"} <= set(data)


def test_open_api_when_no_token_is_set() -> None:
    with running_server() as srv:
        http = TestClient(create_app(srv))
        assert http.post("/cache/clear").status_code == 200
