"""The L2 layer inside a real KvhiveServer: /quota, /status, /config, shutdown order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kvhive.config import parse_server_args
from kvhive.http.app import create_app
from kvhive.http.routes import quota
from kvhive.server.core import KvhiveServer
from support.net import free_port
from support.servers import running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KvhiveServer]:
    fs = {
        "type": "fs",
        "base_path": str(tmp_path / "l2"),
        "eviction": {"eviction_policy": "IsolatedLRU"},
    }
    s3_like = {"type": "s3", "s3_endpoint": "s3://b.h", "s3_region": "r", "aws_access_key_id": "id",
               "aws_secret_access_key": "secret"}  # fmt: skip
    assert parse_server_args(["--l1-size-gb", "1", "--eviction-policy", "LRU", "--l2-adapter",
                              json.dumps(s3_like)]).to_dict()["l2"]["adapters"][0]["aws_secret_access_key"] == "***"  # fmt: skip
    with running_server("--l2-adapter", json.dumps(fs)) as srv:
        yield srv


def test_quota_endpoints_have_the_reference_shapes(server: KvhiveServer) -> None:
    client = TestClient(create_app(server))
    assert client.get("/quota").json() == {"users": {}}
    r = client.put("/quota/_default", json={"limit_gb": 1.5})
    assert r.status_code == 200 and r.json() == {
        "cache_salt": "_default",
        "limit_gb": 1.5,
        "status": "ok",
    }
    assert server.quotas.get("") == int(1.5 * 2**30)
    assert client.get("/quota/_default").json() == {
        "cache_salt": "_default", "limit_gb": 1.5, "current_usage_gb": 0.0, "exists": True}  # fmt: skip
    assert client.get("/quota/nobody").json()["exists"] is False
    assert client.get("/quota").json() == {
        "users": {"_default": {"limit_gb": 1.5, "current_usage_gb": 0.0}}
    }
    for body, error in [
        ("{x", "invalid JSON body"),
        ("[1]", "body must be {'limit_gb': <float>}"),
        ('{"limit_gb": "a"}', "limit_gb must be numeric"),
        ('{"limit_gb": "nan"}', "limit_gb must be finite"),
        ('{"limit_gb": -1}', "limit_gb must be in 0..1073741824 (GiB)"),
    ]:
        r = client.put("/quota/t", content=body, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()) == (400, {"error": error})
    assert client.delete("/quota/_default").json() == {
        "cache_salt": "_default",
        "status": "removed",
    }
    assert client.delete("/quota/_default").json() == {
        "cache_salt": "_default",
        "status": "not_found",
    }


def test_quota_before_the_engine_is_up() -> None:
    app = FastAPI()
    app.include_router(quota.router)
    r = TestClient(app).get("/quota")
    assert (r.status_code, r.json()) == (503, {"error": "engine not initialized"})


def test_status_and_config_show_l2(server: KvhiveServer) -> None:
    client = TestClient(create_app(server))
    l2 = client.get("/status").json()["l2"]
    assert l2["adapters"][0]["type"] == "fs" and l2["adapters"][0]["durable"] is True
    assert l2["store_policy"] == "default" and "lanes" in l2["store"]
    assert client.get("/config").json()["l2"]["adapters"][0]["type"] == "fs"


def test_a_bad_adapter_at_start_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvhive.cli.main import main

    bad = {"type": "plugin", "module_path": str(tmp_path / "missing.py"), "class_name": "X"}
    argv = ["server", "--port", str(free_port()), "--http-port", str(free_port()), "--l1-size-gb", "0.01",
            "--eviction-policy", "LRU", "--l2-adapter", json.dumps(bad)]  # fmt: skip
    assert main(argv) == 2
    assert "--l2-adapter #0 (plugin): cannot import" in capsys.readouterr().err


def test_cache_objects_lists_and_deletes_l2(server: KvhiveServer, tmp_path: Path) -> None:
    import time

    from kvhive.keys import ObjectKey, pack_kv_rank

    keys = [ObjectKey(bytes([i]) * 32, "m", pack_kv_rank(1, 0)) for i in range(3)]
    slots = server.l1.reserve(keys, 8192, ("test", 1))
    for i, slot in enumerate(slots):
        server.l1.view(slot)[:] = i
    server.l1.commit(slots)  # write-behind pushes them to the fs adapter
    deadline = time.monotonic() + 10
    while len(server.l2.adapters[0].tracker.snapshot()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    client = TestClient(create_app(server))
    page = client.get("/cache/objects", params={"page_size": 2}).json()
    assert page["adapter"] == "fs" and page["shared"] is False
    assert len(page["entries"]) == 2 and page["next_page_token"]
    rest = client.get("/cache/objects", params={"page_token": page["next_page_token"]}).json()
    listed = {e["key"]["chunk_hash_hex"] for e in page["entries"] + rest["entries"]}
    assert listed == {k.chunk_hash.hex() for k in keys}
    assert all(8192 <= e["size_bytes"] <= 8192 + 64 for e in page["entries"])  # + integrity trailer
    assert client.get("/cache/objects", params={"adapter": "s3"}).status_code == 404
    victim = page["entries"][0]["key"]
    r = client.request("DELETE", "/cache/objects", json={"keys": [victim], "tier": "l2"})
    assert r.status_code == 200 and r.json() == {"deleted": 1, "skipped": 0, "ok": True}
    left = client.get("/cache/objects", params={"page_size": 10}).json()["entries"]
    assert victim["chunk_hash_hex"] not in {e["key"]["chunk_hash_hex"] for e in left}
    assert len(left) == 2


def test_a_lost_shared_tier_degrades_the_node_but_requests_are_served(tmp_path: Path) -> None:
    """The resp tier's redis-server dies under a running server (a real fault): requests are
    still served from L1, /healthcheck says "degraded" (200) naming the tier, /status and
    /metrics show it down; when the tier answers again the node is healthy again."""
    import shutil
    import subprocess
    import time

    from kvhive.bench.l2_services import stop as _stop
    from kvhive.bench.l2_services import wait_port as _wait_port
    from support import traffic as tr
    from support.require import unavailable

    exe = shutil.which("redis-server")
    if exe is None:
        unavailable("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path), "--protected-mode", "no"]  # fmt: skip
    redis_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tier = {"type": "resp", "host": "127.0.0.1", "port": port, "socket_timeout_s": 0.5,
            "timeout_s": 2.0}  # fmt: skip
    try:
        _wait_port(port, redis_proc, "redis-server")
        with tr.running_server("--l2-adapter", json.dumps(tier)) as srv, tr.shm_kv() as kv:
            client = TestClient(create_app(srv))
            traffic = tr.Traffic(srv, kv)
            try:
                assert traffic.round(2, "r0") == 2
                assert client.get("/healthcheck").json() == {"status": "healthy"}
                _stop(redis_proc)
                for i in range(1, 6):  # each round's write-behind fails: L1 still serves
                    assert traffic.round(2, f"r{i}", offset=1 + 1000 * i) == 2
                deadline = time.monotonic() + 20
                while not srv.degraded() and time.monotonic() < deadline:
                    time.sleep(0.1)
                resp = client.get("/healthcheck")
                assert resp.status_code == 200, resp.text
                body = resp.json()
                assert body["status"] == "degraded" and "(resp)" in body["reasons"][0], body
                status = client.get("/status").json()
                assert status["is_healthy"] is True and status["degraded_reasons"]
                assert status["l2"]["adapters"][0]["health"]["available"] is False
                assert "kvhive_l2_adapter_up{" in client.get("/metrics").text
                assert any(line.startswith("kvhive_l2_adapter_up{") and line.endswith(" 0.0")
                           for line in client.get("/metrics").text.splitlines())  # fmt: skip
                redis_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)  # fmt: skip
                _wait_port(port, redis_proc, "redis-server")
                deadline = time.monotonic() + 20
                i = 10
                while srv.degraded() and time.monotonic() < deadline:
                    assert traffic.round(1, f"r{i}", offset=1 + 1000 * i) == 1
                    i += 1
                    time.sleep(0.2)
                assert client.get("/healthcheck").json() == {"status": "healthy"}
            finally:
                traffic.close()
    finally:
        _stop(redis_proc)
