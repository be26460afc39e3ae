"""vLLM end to end with ``mooncake_store`` as the only tier under ``skip_l1`` (the e2e
suite's SmolLM2 repeat prompt, ``tests/e2e``): the cold request's chunks go to Mooncake and
leave L1; the repeat finds them there, prefetches them back and generates the same text."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mc_testlib import Master, client_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the e2e helpers
from e2e_support import (
    PROMPT_TOKENS,
    RunResult,
    Servers,
    VllmEnv,
    full_chunk_prefix,
    require_vllm_env,
    run_vllm,
)
from e2e_support import baseline as cached_baseline

# Under skip_l1 a chunk leaves L1 only once Mooncake stored it; the repeat waits this long
# so that it is served by the tier, not by an L1 copy whose L2 write is still running.
SKIP_L1_SETTLE_S = 2.0


@pytest.fixture(scope="module")
def vllm_env() -> VllmEnv:
    return require_vllm_env()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    s.stop_all()


@pytest.mark.timeout(900)
def test_mooncake_alone_under_skip_l1_serves_the_repeat(
    vllm_env: VllmEnv, servers: Servers, master: Master
) -> None:
    baseline: RunResult = cached_baseline(vllm_env)
    tier = json.dumps({"type": "mooncake_store", **client_config(master.addr)})
    server = servers.start(["--l2-store-policy", "skip_l1", "--eviction-policy", "noop",
                            "--l2-adapter", tier])  # fmt: skip
    run = run_vllm(vllm_env, "lmcache_driven", port=server.rpc_port, repeats=2,
                   pause_s=SKIP_L1_SETTLE_S)  # fmt: skip
    status = server.status()
    server.stop()
    hit = full_chunk_prefix(PROMPT_TOKENS, int(status["chunk_size"]))
    chunks = hit // int(status["chunk_size"])
    assert run.cold["num_cached_tokens"] == 0
    assert run.repeat["num_cached_tokens"] == hit
    for req in run.requests:
        assert req["token_ids"] == baseline.cold["token_ids"], req["text"]
    (adapter,) = status["l2"]["adapters"]
    assert adapter["type"] == "mooncake_store"
    assert (adapter["stored"], adapter["loaded"]) == (chunks, chunks), adapter
    assert status["counters"]["lookup_hit_chunks"] == chunks
    assert status["counters"]["retrieve_failures"] == 0
