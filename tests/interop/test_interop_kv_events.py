"""KV events (``subscribe_kv_events``) with the real lmcache 0.5.6 worker adapter.

The adapter is built with ``enable_kv_events=True`` (what vLLM's connector does when vLLM's
KV events are on): it sees ``kv_event_stream`` in ``get_experimental``, subscribes in its
receiver thread and republishes the server's records as vLLM cache events.  The driver
(``drivers/kv_events.py``) stores a 4-chunk request in two steps, then 12 x 8 chunks of
1 MiB into a 0.05 GB L1 (evictions), then clears; on a raw DEALER it checks the stream's
framing (credits, replacement, cancel, bad arguments) and that every batch re-encodes with
the reference's own ``KVEventBatch`` to the same bytes.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop

CHUNKS, EVICT_REQUESTS, EVICT_CHUNKS = 4, 12, 8


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(l1_size_gb=0.05)


@pytest.fixture(scope="module")
def kv_event_results():
    return {}


@pytest.fixture
def run_kv_events(server, attach_server, driver, kv_event_results):
    attach_server(server)

    def run(mode: str) -> dict:
        if mode not in kv_event_results:
            kv_event_results[mode] = driver.run(
                "kv_events.py",
                "--url",
                server.rpc_url,
                "--mode",
                mode,
                "--model",
                f"kv-{mode}",
                "--chunks",
                str(CHUNKS),
                "--evict-requests",
                str(EVICT_REQUESTS),
                "--evict-chunks",
                str(EVICT_CHUNKS),
            )
        return kv_event_results[mode]

    return run


@pytest.mark.parametrize("mode", ["lmcache_driven", "engine_driven"])
def test_adapter_subscribes_and_sees_stored_chunks(run_kv_events, mode):
    res = run_kv_events(mode)
    assert res["capability"] and res["server_source"] and res["subscribed"], res
    assert res["store_ok"] == [True, True]
    # Exactly the stored chunks, in order, with their parents (the second store step's first
    # parent comes from the server's session) and their tokens.
    assert res["stored_count"] == CHUNKS, res
    assert res["stored_hashes_equal"] and res["stored_parents_equal"], res
    assert res["stored_tokens_equal"], res
    assert res["stored_block_size"] == [256] and res["stored_medium"] == ["CPU"]
    assert res["early_removed"] == 0


@pytest.mark.parametrize("mode", ["lmcache_driven", "engine_driven"])
def test_evictions_and_clear_are_removed(run_kv_events, mode):
    res = run_kv_events(mode)
    # L1 cannot hold 100 MiB: the oldest chunks (the first request's first) were evicted,
    # and only announced chunks are withdrawn.
    assert res["evicted"] > 0, res
    assert res["evicted_first_request"], res
    assert res["removed_unannounced"] == 0
    # The clear withdraws everything the adapter still announced.
    assert res["clear_removed_rest"], res
    assert res["still_announced"] == 0
    assert res["resyncs"] == {"events_lost": 0, "server_restart": 0, "stream_closed": 0}
    assert res["ping_after"] is True


@pytest.mark.parametrize("mode", ["lmcache_driven", "engine_driven"])
def test_every_store_is_announced(run_kv_events, xfail_on_reference, mode):
    xfail_on_reference("stores that find L1 full are dropped (defect 11): never announced")
    res = run_kv_events(mode)
    assert res["evict_stored"] == EVICT_REQUESTS * EVICT_CHUNKS, res


def test_stream_framing_with_the_reference_types(run_kv_events):
    res = run_kv_events("lmcache_driven")
    assert res["first_frames"] == 3 and res["raw_enabled"] is True
    assert res["raw_kinds"] == ["removed", "stored"], res
    assert res["raw_reencoded_equal"] is True
    # One batch in flight: the clear's records waited for the ack.
    assert res["second_without_ack"] is False
    assert res["after_ack_kinds"] == ["removed"]
    assert res["after_ack_reencoded_equal"] is True
    # A second subscription of the instance ends the first; a cancel gets the end frame.
    assert res["replaced_end"] and res["replacement_first"], res
    assert res["cancel_end_frames"] == 2


def test_bad_arguments_get_an_error_reply(run_kv_events, xfail_on_reference):
    xfail_on_reference("a subscription with bad arguments is never answered")
    res = run_kv_events("lmcache_driven")
    assert str(res["bad_max_events_reply"]).startswith("error: bad_request:"), res
