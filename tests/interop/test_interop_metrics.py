"""/metrics after real traffic from the unmodified lmcache 0.5.6 client (vLLM adapters).

The round-trip driver stores 8 chunks, looks them up (full hit), looks up a partial and an
unrelated prefix, looks up again for the vLLM prefix-cache overlap, and retrieves.  The
reference metric names must then carry the matching values.
"""

from __future__ import annotations

import time

import pytest

from support.prom import Sample, scrape, value

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def server(start_server, target):
    if target != "kvhive":
        pytest.skip("metric values are asserted for kvhive (the reference counts at consumption)")
    return start_server(l1_size_gb=0.5, extra=["--service-instance-id", "interop-metrics"])


def metrics(server) -> list[Sample]:
    code, body = server.http_get("/metrics")
    assert code == 200, body
    return scrape(body)


def wait_for(server, name: str, want: float, timeout: float = 10.0) -> list[Sample]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if value(m, name) >= want or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_metrics_follow_lmcache_client_traffic(server, attach_server, driver, settle_ms):
    attach_server(server)
    before = metrics(server)
    assert value(before, "lmcache_mp_lookup_hit_tokens_total") == 0
    chunks = 8
    res = driver.run(
        "roundtrip.py", "--url", server.rpc_url, "--mode", "lmcache_driven",
        "--block-size", "16", "--dtype", "bfloat16", "--storage", "per-layer",
        "--model", "metrics-model", "--num-chunks", str(chunks), "--settle-ms", str(settle_ms),
    )  # fmt: skip
    c = res["chunk_size"]
    hits = sum(res[k] for k in ("full_hit_tokens", "partial_hit_tokens", "zero_hit_tokens",
                                "apc_hit_tokens"))  # fmt: skip
    assert hits == (2 * chunks + 3) * c
    m = wait_for(server, "lmcache_mp_lookup_hit_tokens_total", hits)
    model = {"model_name": "metrics-model"}
    assert value(m, "lmcache_mp_lookup_hit_tokens_total", **model) == hits
    assert value(m, "lmcache_mp_lookup_hit_l1_tokens_total", **model) == hits
    assert value(m, "lmcache_mp_lookups_requests_total", **model) >= 4
    assert value(m, "lmcache_mp_lookup_requested_tokens_total", **model) >= hits
    assert value(m, "lmcache_mp_l1_write_chunks_total") == chunks  # stored once, then resident
    assert value(m, "lmcache_mp_num_submitted_stores_total", device="cpu") >= 2
    assert value(m, "lmcache_mp_num_finished_retrieves_total") >= 3
    assert value(m, "lmcache_mp_l1_read_chunks_total") >= chunks
    assert value(m, "lmcache_mp_num_chunks_loaded_total") >= chunks
    assert value(m, "kvhive_stored_bytes_total") > 0
    assert value(m, "kvhive_retrieved_bytes_total") > 0
    assert value(m, "lmcache_mp_event_bus_dropped_events_total") == 0
    assert value(m, "target_info", service_instance_id="interop-metrics") == 1
    # the bus-independent engine counters agree with the event-fed ones
    assert value(m, "kvhive_engine_stored_chunks_total") == chunks
