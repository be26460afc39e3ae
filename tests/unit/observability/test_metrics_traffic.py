"""Prometheus metrics change as expected after real store/lookup/retrieve traffic."""

from __future__ import annotations

import urllib.request

from fastapi.testclient import TestClient

from kvhive.http.app import create_app
from support.prom import scrape, value
from support.traffic import C, Traffic, running_server, shm_kv


def test_metrics_follow_real_traffic() -> None:
    with running_server("--service-instance-id", "obs-test-1") as server, shm_kv() as kv:
        http = TestClient(create_app(server))
        before = scrape(http.get("/metrics").text)
        assert value(before, "lmcache_mp_l1_write_chunks_total") == 0
        traffic = Traffic(server, kv)
        try:
            assert traffic.round(3, "r1") == 3
            assert traffic.lookup(list(range(5000, 5000 + 2 * C)), "miss") == 0
            traffic.end("miss")
        finally:
            traffic.close()
        assert server.obs.bus.flush()
        resp = http.get("/metrics")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        m = scrape(resp.text)
    # reference names (as the OTel Prometheus export spells them)
    assert value(m, "lmcache_mp_l1_write_chunks_total", l1_tag="_default") == 3
    assert value(m, "lmcache_mp_l1_read_chunks_total") == 3
    assert value(m, "lmcache_mp_num_submitted_stores_total", device="cpu") == 1
    assert value(m, "lmcache_mp_num_finished_stores_total") == 1
    assert value(m, "lmcache_mp_num_submitted_retrieves_total") == 1
    assert value(m, "lmcache_mp_num_finished_retrieves_total") == 1
    assert value(m, "lmcache_mp_num_chunks_loaded_total", worker_id="77") == 3
    assert value(m, "lmcache_mp_lookups_requests_total", model_name="obs-model") == 2
    assert value(m, "lmcache_mp_lookup_requested_tokens_total") == 5 * C
    assert value(m, "lmcache_mp_lookup_hit_tokens_total") == 3 * C
    assert value(m, "lmcache_mp_lookup_hit_l1_tokens_total") == 3 * C
    assert value(m, "lmcache_mp_lookup_hit_l2_tokens_total") == 0
    assert value(m, "lmcache_mp_lookup_hit_l1_keys_total") == 3
    assert value(m, "lmcache_mp_l0_l1_store_throughput_GB_per_second_count") == 1
    assert value(m, "lmcache_mp_l0_l1_load_throughput_GB_per_second_count") == 1
    assert value(m, "lmcache_mp_l1_memory_usage_bytes") == 3 * 8192  # 6144 B aligned to 4 KiB
    assert 0 < value(m, "lmcache_mp_l1_usage_ratio") < 1
    assert value(m, "lmcache_mp_event_bus_dropped_events_total") == 0
    assert value(m, "lmcache_mp_event_bus_queue_depth") == 0
    # kvhive's own
    obj = 2 * 3 * 2 * 8 * 32 * 2  # K+V, layers, heads, head size, tokens, fp16 = 6144 bytes
    assert value(m, "kvhive_stored_bytes_total") == 3 * obj
    assert value(m, "kvhive_retrieved_bytes_total") == 3 * obj
    assert value(m, "kvhive_tier_hit_ratio", tier="l1", adapter="") == 3 / 5
    assert value(m, "kvhive_tier_hit_tokens_total", tier="miss") == 2 * C
    assert value(m, "kvhive_engine_stored_chunks_total") == 3
    assert value(m, "kvhive_l1_objects") == 3
    assert value(m, "kvhive_registered_instances") == 1
    assert value(m, "kvhive_copy_throughput_GB_per_second", direction="store") > 0
    assert value(m, "target_info", service_instance_id="obs-test-1", service_name="kvhive") == 1


def test_prometheus_port_serves_the_same_registry() -> None:
    with running_server() as server:
        port = server.obs.prometheus_port
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert "lmcache_mp_event_bus_queue_depth" in text and "target_info" in text


def test_prometheus_port_in_use_is_a_warning(caplog) -> None:
    with running_server() as first:
        busy = first.obs.prometheus_port
        with running_server("--prometheus-port", str(busy)) as second:
            assert second.obs.prometheus_port is None
            assert (
                "lmcache_mp_l1_usage_ratio" in TestClient(create_app(second)).get("/metrics").text
            )
    assert any("Prometheus listener not started" in r.message for r in caplog.records)


def test_disable_metrics_leaves_process_collectors_only() -> None:
    with running_server("--disable-metrics") as server:
        text = TestClient(create_app(server)).get("/metrics").text
        assert "process_cpu_seconds_total" in text or "python_info" in text
        assert "lmcache_mp" not in text and server.obs.prometheus_port is None


def test_disable_observability_turns_the_bus_off() -> None:
    with running_server("--disable-observability") as server, shm_kv() as kv:
        assert not server.obs.bus.enabled and not server.obs.bus.alive
        traffic = Traffic(server, kv)
        try:
            assert traffic.round(2, "r") == 2
        finally:
            traffic.close()
        assert server.obs.bus.delivered == 0 and server.obs.bus.queue_depth == 0
        assert "lmcache_mp" not in TestClient(create_app(server)).get("/metrics").text
