"""vLLM across nodes: an engine + kvhive on node A serves the SmolLM2 repeat prompt of the e2e
suite (``tests/e2e``) once, storing its 6 full chunks; a second engine + kvhive on node B,
which never saw the prompt, serves it once too and loads the 1536-token prefix from the
shared tier over the veths, generating the same tokens as vLLM without a connector.  Once
with a Mooncake Store pool (master on node M, one segment per kvhive), once with a Valkey
Cluster on node M.  Each engine dials its own node's kvhive on the node's loopback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fleet_testlib import (
    MakeFleet,
    Master,
    delta,
    mooncake_tier,
    report,
    start_cluster,
    start_kvhive,
    valkey_tier,
    wait_written_behind,
)

from support.fleet import Fleet, Node

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the e2e helpers
from e2e_support import (
    PROMPT_TOKENS,
    RunResult,
    VllmEnv,
    full_chunk_prefix,
    require_vllm_env,
    run_vllm,
)
from e2e_support import baseline as cached_baseline

pytestmark = [pytest.mark.timeout(900)]

#: backend -> (fleet) -> per-node tier maker
TierFor = Callable[[Node], dict[str, Any]]


@pytest.fixture(scope="module")
def vllm_env() -> VllmEnv:
    return require_vllm_env()


@pytest.fixture(scope="module")
def baseline(vllm_env: VllmEnv) -> RunResult:
    """The prompt through vLLM with no connector at all (no network needed)."""
    return cached_baseline(vllm_env)


def in_node(env: VllmEnv, node: Node, tmp: Path) -> VllmEnv:
    """``env`` whose python runs inside ``node`` (a wrapper script: ``ip netns exec``)."""
    wrapper = tmp / f"python-in-{node.name}"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(node.argv([env.python]))} "$@"\n')
    wrapper.chmod(0o755)
    return VllmEnv(str(wrapper), env.model)


def _mooncake(fleet: Fleet, log_dir: Path) -> TierFor:
    master = Master(fleet["m"], log_dir)
    master.start()
    return lambda node: mooncake_tier(node, master)


def _valkey(fleet: Fleet, log_dir: Path) -> TierFor:
    cluster = start_cluster(fleet["m"], log_dir)
    return lambda node: valkey_tier(cluster)


BACKENDS: dict[str, Callable[[Fleet, Path], TierFor]] = {
    "mooncake": _mooncake,
    "valkey": _valkey,
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_engine_on_b_loads_the_prefix_engine_on_a_stored(
    backend: str,
    vllm_env: VllmEnv,
    baseline: RunResult,
    make_fleet: MakeFleet,
    log_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    if backend == "mooncake":
        request.getfixturevalue("mooncake_ok")
    fleet = make_fleet(["m", "a", "b"])
    a, b = fleet["a"], fleet["b"]
    tier_for = BACKENDS[backend](fleet, log_dir)
    kv_a = start_kvhive(a, log_dir, [tier_for(a)], l1_size_gb=1.0)
    kv_b = start_kvhive(b, log_dir, [tier_for(b)], l1_size_gb=1.0)

    before_a = a.counters()
    stored = run_vllm(in_node(vllm_env, a, log_dir), "lmcache_driven", port=kv_a.rpc_port,
                      repeats=1)  # fmt: skip
    chunk = int(kv_a.status()["chunk_size"])
    hit = full_chunk_prefix(PROMPT_TOKENS, chunk)
    chunks = hit // chunk
    status_a = wait_written_behind(kv_a, chunks)
    a_store = delta(before_a, a.counters())
    assert stored.cold["num_cached_tokens"] == 0
    assert stored.cold["token_ids"] == baseline.cold["token_ids"]

    before_b = b.counters()
    loaded = run_vllm(in_node(vllm_env, b, log_dir), "lmcache_driven", port=kv_b.rpc_port,
                      repeats=1)  # fmt: skip
    b_load = delta(before_b, b.counters())
    status_b = kv_b.status()
    req = loaded.cold
    conn = req.get("connector_cached") or {}
    assert hit == 1536
    assert req["num_cached_tokens"] == hit, req
    assert conn.get("num_lmcache_cached_tokens") == hit, conn
    assert req["external_prompt_tokens"] == hit, req
    assert req["token_ids"] == baseline.cold["token_ids"], (req["text"], baseline.cold["text"])
    assert req["text"] == baseline.cold["text"]

    counters = status_b["counters"]
    assert counters["lookup_hit_chunks"] == chunks
    assert counters["retrieved_chunks"] == chunks
    assert counters["retrieve_failures"] == 0
    assert counters["stored_chunks"] == 0  # B computed only the tail
    (tier_b,) = status_b["l2"]["adapters"]
    tier_a = status_a["l2"]["adapters"][0]
    assert (tier_b["loaded"], tier_b["stored"], tier_a["stored"]) == (chunks, 0, chunks), tier_b
    payload = int(tier_a["used_bytes"])  # the 6 chunks as stored (trailers included)
    if backend == "mooncake":
        # Each byte crossed a veth: A -> B's segment when stored, or A's segment -> B when
        # loaded (placement is Mooncake's random choice).
        assert a_store["tx_bytes"] + b_load["rx_bytes"] >= payload, (a_store, b_load)
    else:  # A -> the cluster on M, then M -> B
        assert min(a_store["tx_bytes"], b_load["rx_bytes"]) >= payload, (a_store, b_load)
    report(f"vLLM A->B {backend}", chunks=chunks, payload=payload,
           a_tx_during_run=a_store["tx_bytes"], b_rx_during_run=b_load["rx_bytes"],
           a_request_s=stored.cold["seconds"], b_request_s=req["seconds"])  # fmt: skip
