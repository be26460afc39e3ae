"""Client lifecycle: explicit unregister, and a client SIGKILLed mid-session.

Both leave the session after the lookup (read locks held) and before the
retrieve. Afterwards the instance must be gone from GET /status and no read
lock or staging object may remain.

Ops exercised: register, store, ping(instance_id), lookup,
query_prefetch_status, then unregister_kv_cache (or the engine-driven
unregister) + end_session, or nothing at all (SIGKILL) and server-side reaping.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.interop

REAP_TIMEOUT_S = 30  # the smallest value the reference accepts
REAP_DEADLINE_S = 48  # reap timeout + reaper period (timeout/4) + slack; typically ~33 s


def wait_for(predicate, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


@pytest.fixture
def server(fresh_server):
    return fresh_server(
        l1_size_gb=0.2, extra=["--worker-reap-timeout-seconds", str(REAP_TIMEOUT_S)]
    )


@pytest.mark.parametrize("mode", ["lmcache_driven", "engine_driven"])
def test_unregister_releases_everything(server, driver, settle_ms, xfail_on_reference, mode):
    xfail_on_reference("end_session never releases lookup locks (defect 17)")
    res = driver.run(
        "lifecycle.py",
        "--url",
        server.rpc_url,
        "--mode",
        mode,
        "--phase",
        "unregister",
        "--model",
        f"lc-unreg-{mode}",
        "--settle-ms",
        str(settle_ms),
    )
    assert res["store_ok"] is True
    assert res["hit_tokens"] == 4 * res["chunk_size"]
    summary = (
        wait_for(
            lambda: (s := server.summary()).read_locked == 0 and s.staging == 0 and s, timeout=5
        )
        or server.summary()
    )
    assert str(res["instance_id"]) not in summary.instances
    assert summary.read_locked == 0
    assert summary.staging == 0


def test_sigkill_mid_session_is_reaped(
    server, driver, settle_ms, xfail_on_reference, attach_context
):
    xfail_on_reference("reaping drops the registration but not the lookup's read locks")
    bg = driver.spawn(
        "lifecycle.py",
        "--url",
        server.rpc_url,
        "--mode",
        "lmcache_driven",
        "--phase",
        "hold",
        "--model",
        "lc-kill",
        "--settle-ms",
        str(settle_ms),
    )
    attach_context("held driver", bg.context)
    try:
        res = bg.wait_result(timeout=60)
        assert res["ready"] is True
        assert res["hit_tokens"] == 4 * res["chunk_size"]
        iid = str(res["instance_id"])
        before = server.summary()
        assert iid in before.instances
        assert before.read_locked >= 4, "the lookup should hold read locks until the retrieve"
    finally:
        bg.kill()
    gone = wait_for(lambda: iid not in server.summary().instances, timeout=REAP_DEADLINE_S)
    assert gone, f"instance {iid} not reaped within {REAP_DEADLINE_S}s of SIGKILL"
    summary = (
        wait_for(
            lambda: (s := server.summary()).read_locked == 0 and s.staging == 0 and s,
            timeout=5,  # reaping the instance releases what its session held
        )
        or server.summary()
    )
    assert summary.read_locked == 0
    assert summary.staging == 0
    assert server.alive()
