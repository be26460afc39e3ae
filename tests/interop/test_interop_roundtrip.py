"""Real lmcache 0.5.6 vLLM adapters: store, lookup (full/partial/zero hit), retrieve.

Ops exercised: get_chunk_size, get_experimental, register_kv_cache (cpu_shm,
lmcache-driven) or register_kv_cache_engine_driven_context (engine-driven),
store / prepare_store + commit_store, lookup, query_prefetch_status,
free_lookup_locks, retrieve / prepare_retrieve + commit_retrieve,
end_session, ping (heartbeat), unregister.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop

CASES = [
    # mode, block size, dtype, storage variant
    pytest.param("lmcache_driven", 16, "bfloat16", "per-layer", id="lmcache_driven-bs16-bf16"),
    pytest.param("lmcache_driven", 128, "float16", "shared", id="lmcache_driven-bs128-fp16-shared"),
    pytest.param("engine_driven", 16, "float16", "per-layer", id="engine_driven-bs16-fp16"),
    pytest.param("engine_driven", 128, "bfloat16", "shared", id="engine_driven-bs128-bf16-shared"),
]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(l1_size_gb=0.5)


@pytest.mark.parametrize(("mode", "block_size", "dtype", "storage"), CASES)
def test_roundtrip(server, attach_server, driver, settle_ms, mode, block_size, dtype, storage):
    attach_server(server)
    chunks = 8
    res = driver.run(
        "roundtrip.py",
        "--url",
        server.rpc_url,
        "--mode",
        mode,
        "--block-size",
        str(block_size),
        "--dtype",
        dtype,
        "--storage",
        storage,
        "--model",
        f"rt-{mode}-{block_size}-{dtype}-{storage}",
        "--num-chunks",
        str(chunks),
        "--settle-ms",
        str(settle_ms),
    )
    c = res["chunk_size"]
    assert c == 256
    assert res["group_infos"][0]["tokens_per_block"] == block_size
    assert res["store_ok"] == [True, True]

    assert res["full_hit_tokens"] == chunks * c
    assert res["full_retrieve_ok"] is True
    assert res["full_load_errors"] == []
    assert res["full_bytes_equal"] is True

    assert res["partial_hit_tokens"] == 3 * c
    assert res["partial_retrieve_ok"] is True
    assert res["partial_bytes_equal"] is True

    assert res["zero_hit_tokens"] == 0

    assert res["apc_hit_tokens"] == chunks * c
    assert res["apc_retrieve_ok"] is True
    assert res["apc_load_errors"] == []
    assert res["apc_skipped_untouched"] is True, "skip_first_n_tokens overwritten"
    assert res["apc_bytes_equal"] is True
    assert res["store_again_ok"] is True

    # Every lookup lock was consumed by a retrieve or freed; nothing is staged;
    # the worker unregistered on shutdown.
    summary = server.summary()
    assert str(res["instance_id"]) not in summary.instances
    assert summary.read_locked == 0
    assert summary.staging == 0


@pytest.fixture(scope="module")
def shm_pool_server(start_server):
    # The whole L1 is one POSIX segment the engine-driven worker maps (protocol.md §15.5).
    import os

    return start_server(l1_size_gb=0.25, extra=["--shm-name", f"kvhive_it_{os.getpid()}"])


@pytest.mark.parametrize("block_size", [16, 128])
def test_roundtrip_engine_driven_shared_pool(
    shm_pool_server, attach_server, driver, settle_ms, block_size
):
    attach_server(shm_pool_server)
    res = driver.run(
        "roundtrip.py",
        "--url",
        shm_pool_server.rpc_url,
        "--mode",
        "engine_driven",
        "--block-size",
        str(block_size),
        "--dtype",
        "bfloat16",
        "--storage",
        "per-layer",
        "--model",
        f"rt-shmpool-{block_size}",
        "--num-chunks",
        "6",
        "--partial-chunks",
        "2",
        "--settle-ms",
        str(settle_ms),
    )
    c = res["chunk_size"]
    assert res["store_ok"] == [True, True]
    assert res["full_hit_tokens"] == 6 * c and res["full_bytes_equal"] is True
    assert res["partial_hit_tokens"] == 2 * c and res["partial_bytes_equal"] is True
    assert res["zero_hit_tokens"] == 0
    assert res["apc_bytes_equal"] is True and res["apc_skipped_untouched"] is True
    summary = shm_pool_server.summary()
    assert summary.read_locked == 0 and summary.staging == 0
    status = shm_pool_server.status()
    assert status["counters"]["stored_chunks"] >= 6
    # The worker took the shared-pool strategy, not the pickle fallback.
    assert f"rt-shmpool-{block_size}" in shm_pool_server.log_tail()
    assert "shm pool" in shm_pool_server.log_tail()
