"""Re-registration with the same instance_id and a NEW cpu_shm KV cache.

A client that restarts with a fixed instance id must get the new cache's
bytes: retrieves land in the new cache and stores read from it. The reference
keeps the first registration's mapping (defect 6) and silently serves the dead
client's memory with ok=true.

Ops exercised: register_kv_cache twice for one instance_id, store, lookup,
query_prefetch_status, retrieve, end_session, unregister_kv_cache.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


def test_reregister_same_instance_new_cache(fresh_server, driver, settle_ms, xfail_on_reference):
    xfail_on_reference("re-registering a known instance_id keeps the old mapping (defect 6)")
    server = fresh_server(l1_size_gb=0.2)
    res = driver.run("reregister.py", "--url", server.rpc_url, "--settle-ms", str(settle_ms))
    assert res["register_error"] is None, res["register_error"]
    assert res["store_t1_ok"] is True
    assert res["t1_hit_tokens"] == 2 * 256
    assert res["t1_retrieve_ok"] is True
    assert res["t1_into_new_cache"] is True, "retrieve wrote into the old (dead) cache"
    assert res["store_t2_ok"] is True
    assert res["t2_hit_tokens"] == 2 * 256
    assert res["t2_retrieve_ok"] is True
    assert res["t2_from_new_cache"] is True, "store read from the old (dead) cache"
    summary = server.summary()
    assert summary.read_locked == 0
    assert summary.staging == 0
