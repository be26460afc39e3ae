"""A real vLLM engine (CPU, SmolLM2-135M) reuses KV through kvhive, unmodified.

For each transfer mode one kvhive server and one vLLM process: the same 1711-token prompt is
sent twice.  The first request computes everything and stores its 6 full chunks; the second
loads exactly those 1536 tokens from kvhive, computes only the 175-token tail, and generates
the same text as vLLM with no connector at all.  A last case restarts kvhive over an ``fs``
L2 adapter between two vLLM processes: the second one still hits, from L2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_support import (
    PROMPT_TOKENS,
    RunResult,
    Servers,
    VllmEnv,
    full_chunk_prefix,
    run_vllm,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODES = ("lmcache_driven", "engine_driven")


class ModeRun:
    def __init__(self, run: RunResult, status: dict, chunk_size: int) -> None:
        self.run = run
        self.status = status
        self.chunk_size = chunk_size

    @property
    def expected_hit(self) -> int:
        return full_chunk_prefix(PROMPT_TOKENS, self.chunk_size)


@pytest.fixture(scope="module", params=MODES)
def mode_run(request: pytest.FixtureRequest, vllm_env: VllmEnv, servers: Servers) -> ModeRun:
    """One kvhive server and one vLLM process per mode (cold request, then the repeat)."""
    server = servers.start()
    run = run_vllm(vllm_env, request.param, port=server.rpc_port, repeats=2)
    status = server.status()
    server.stop()
    return ModeRun(run, status, int(status["chunk_size"]))


def _loaded_tokens(req: dict) -> dict[str, int | None]:
    """The three independent readings of tokens loaded from the external cache."""
    conn = req.get("connector_cached") or {}
    return {
        "vllm num_cached_tokens": req["num_cached_tokens"],
        "connector lmcache hit": conn.get("num_lmcache_cached_tokens"),
        "vllm external_kv_transfer prompt tokens": req["external_prompt_tokens"],
    }


def test_repeat_request_loads_the_full_chunk_prefix(mode_run: ModeRun) -> None:
    run, hit = mode_run.run, mode_run.expected_hit
    assert hit == 1536 and run.cold["prompt_tokens"] == PROMPT_TOKENS
    assert set(_loaded_tokens(run.cold).values()) == {0}, _loaded_tokens(run.cold)
    assert set(_loaded_tokens(run.repeat).values()) == {hit}, _loaded_tokens(run.repeat)
    conn = run.repeat["connector_cached"]
    assert conn["num_vllm_cached_tokens"] == 0  # vLLM's own prefix cache is off
    assert conn["num_lmcache_extra_cached_tokens"] == hit


def test_text_equals_a_run_without_connector(mode_run: ModeRun, baseline: RunResult) -> None:
    expected = baseline.cold
    assert expected["token_ids"], "the baseline generated nothing"
    for req in mode_run.run.requests:
        assert req["token_ids"] == expected["token_ids"], (req["text"], expected["text"])
        assert req["text"] == expected["text"]


def test_stores_and_hits_show_in_status(mode_run: ModeRun) -> None:
    chunks = mode_run.expected_hit // mode_run.chunk_size
    counters, l1 = mode_run.status["counters"], mode_run.status["l1"]
    assert counters["stored_chunks"] == chunks
    assert counters["store_dropped"] == 0
    assert counters["lookup_hit_chunks"] == chunks  # the cold lookup misses, the repeat hits 6
    assert counters["retrieved_chunks"] == chunks
    assert counters["retrieve_failures"] == 0
    assert l1["objects"] == chunks
    assert mode_run.status["requests"]["errors"] == {}
    assert mode_run.status["requests"]["soft_failures"] == {}


def test_fs_l2_serves_the_prefix_after_a_restart(
    vllm_env: VllmEnv, servers: Servers, baseline: RunResult, tmp_path: Path
) -> None:
    extra = ["--l2-adapter", f'{{"type": "fs", "base_path": "{tmp_path / "l2"}"}}']
    first = servers.start(extra)
    stored = run_vllm(vllm_env, "lmcache_driven", port=first.rpc_port, repeats=1)
    assert stored.cold["num_cached_tokens"] == 0
    first.stop()  # an orderly stop drains the L2 write-behind

    second = servers.start(extra)
    again = run_vllm(vllm_env, "lmcache_driven", port=second.rpc_port, repeats=1)
    status = second.status()
    hit = full_chunk_prefix(PROMPT_TOKENS, int(status["chunk_size"]))
    assert set(_loaded_tokens(again.cold).values()) == {hit}, _loaded_tokens(again.cold)
    assert again.cold["token_ids"] == baseline.cold["token_ids"]
    chunks = hit // int(status["chunk_size"])
    assert status["counters"]["lookup_hit_chunks"] == chunks
    assert status["counters"]["retrieved_chunks"] == chunks
    assert status["counters"]["stored_chunks"] == 0  # nothing new: all came from L2


def test_nixl_store_alone_under_skip_l1_serves_the_repeat(
    vllm_env: VllmEnv, servers: Servers, baseline: RunResult, tmp_path: Path
) -> None:
    """nixl_store (real NIXL, POSIX files) as the only tier under skip_l1, as in the seed's
    full example: the cold request's chunks go to NIXL and leave L1; the repeat finds them
    in L2, prefetches them back and generates the same text."""
    pytest.importorskip("nixl_cu12._api", reason="pip install --no-deps nixl-cu12==1.5.1")
    nixl = ('{"type": "nixl_store", "backend": "POSIX", "pool_size": 8, "backend_params": '
            f'{{"file_path": "{tmp_path / "l2"}", "use_direct_io": "false", '
            f'"file_size": "{16 << 20}"}}}}')  # fmt: skip
    server = servers.start(["--l2-store-policy", "skip_l1", "--eviction-policy", "noop",
                            "--l2-adapter", nixl])  # fmt: skip
    run = run_vllm(vllm_env, "lmcache_driven", port=server.rpc_port, repeats=2)
    status = server.status()
    server.stop()
    hit = full_chunk_prefix(PROMPT_TOKENS, int(status["chunk_size"]))
    chunks = hit // int(status["chunk_size"])
    assert set(_loaded_tokens(run.cold).values()) == {0}, _loaded_tokens(run.cold)
    assert set(_loaded_tokens(run.repeat).values()) == {hit}, _loaded_tokens(run.repeat)
    for req in run.requests:
        assert req["token_ids"] == baseline.cold["token_ids"], req["text"]
    (adapter,) = status["l2"]["adapters"]
    assert (adapter["stored"], adapter["loaded"]) == (chunks, chunks), adapter
    assert status["counters"]["lookup_hit_chunks"] == chunks
    assert status["counters"]["retrieve_failures"] == 0
