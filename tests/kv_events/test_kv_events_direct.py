"""The direct publisher (``--kv-events-endpoint``) seen by a subscriber built on vLLM's own
classes: CPU stores and evictions with vLLM's int hashes, STORAGE records behind
``--kv-events-l2`` (including chunks another node wrote to a shared fs tier), replay, and an
endpoint that cannot be bound."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvhive.bench.config import KVShape
from kvhive.bench.kvengine import KvhiveEngine, make_tokens
from kvhive.bench.servers import subprocess_env
from kvhive.hashing import build_token_hasher
from support.net import free_port

HERE = Path(__file__).resolve().parent
TINY = KVShape("tiny", 2, 2, 64)  # 1 KiB a token: 256 KiB a 256-token chunk
CHUNK = 256
MASK = (1 << 64) - 1


def ints(hashes: list[bytes]) -> list[int]:
    return [int.from_bytes(h, "big") & MASK for h in hashes]


def stored(events: list[dict[str, Any]], medium: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "BlockStored" and e["medium"] == medium]


def removed_hashes(events: list[dict[str, Any]], medium: str) -> set[int]:
    return {
        h
        for e in events
        if e["type"] == "BlockRemoved" and e["medium"] == medium
        for h in e["block_hashes"]
    }


def store(url: str, seed: int, n_chunks: int, engine: KvhiveEngine | None = None) -> list[int]:
    """Store ``n_chunks`` chunks of fresh tokens through kvhive's client; returns the tokens."""
    own = engine is None
    eng = engine or KvhiveEngine(url, TINY, num_chunks=n_chunks)
    try:
        if own:
            eng.register()
        tokens = make_tokens(seed, n_chunks * CHUNK)
        assert eng.store(f"s{seed}", tokens, eng.chunk_blocks(0, n_chunks), 0, len(tokens))
        eng.end_session(f"s{seed}")
        return tokens
    finally:
        if own:
            eng.close()


def assert_chain(events: list[dict[str, Any]], tokens: list[int]) -> None:
    """``events`` are BlockStored for each chunk of ``tokens``, parents chained."""
    hashes = build_token_hasher("blake3", CHUNK).chunk_hashes(tokens)
    want = ints(hashes)
    by_hash = {e["block_hashes"][0]: e for e in events if len(e["block_hashes"]) == 1}
    assert set(want) <= set(by_hash), (want, list(by_hash))
    for i, h in enumerate(want):
        e = by_hash[h]
        assert e["parent_block_hash"] == (want[i - 1] if i else None)
        assert e["token_ids"] == tokens[i * CHUNK : (i + 1) * CHUNK]
        assert e["block_size"] == CHUNK
        assert e["lora_id"] is None and e["lora_name"] is None


def test_cpu_stored_removed_with_vllm_hashes_and_replay(server, subscribe, vllm_python) -> None:
    srv = server("--eviction-trigger-watermark", "0.5", l1_size_gb=0.002, replay=True)
    sub = subscribe(srv.pub_url)
    tokens = make_tokens(1, 3 * CHUNK)
    hexes = [h.hex() for h in build_token_hasher("blake3", CHUNK).chunk_hashes(tokens)]
    conv = subprocess.Popen(
        [vllm_python, str(HERE / "vllm_hashes.py"), *hexes],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env(),
    )  # fmt: skip
    sub.ready()
    assert store(srv.rpc_url, 1, 3) == tokens
    rows = sub.wait_for(lambda r: len(stored([e for b in r for e in b["events"]], "CPU")) >= 3,
                        "3 CPU BlockStored")  # fmt: skip
    assert [b["seq"] for b in rows] == list(range(len(rows)))  # from 0, no gap
    assert all(b["topic"] == "" and b["dp_rank"] == 0 for b in rows)
    assert_chain(stored(sub.events(), "CPU"), tokens)
    # The same ints the LMCache connector makes vLLM publish for these chunks.
    out, _ = conv.communicate(timeout=120)
    assert json.loads(out) == ints([bytes.fromhex(h) for h in hexes])
    # A 2 MiB L1 holds 8 chunks: 8 more push the first ones out.
    store(srv.rpc_url, 2, 8)
    first = set(ints([bytes.fromhex(h) for h in hexes]))
    sub.wait_for(lambda r: first & removed_hashes([e for b in r for e in b["events"]], "CPU"),
                 "a CPU BlockRemoved of the first chunks")  # fmt: skip
    live = {b["seq"]: b["events"] for b in sub.batches()}
    # Replay from seq 1 (as a subscriber that missed it would): every buffered batch, then -1.
    r = subprocess.run(
        [vllm_python, str(REPO_SUB), "--replay", srv.replay_url, "--from", "1", "--seconds", "20"],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    replayed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert replayed[-1] == {"endpoint": srv.replay_url, "seq": -1, "end": True}
    got = {b["seq"]: b["events"] for b in replayed[:-1]}
    assert min(got) == 1 and sorted(got) == list(range(1, max(got) + 1))
    assert all(got[s] == live[s] for s in live if s >= 1)
    status = srv.status()["kv_publisher"]
    assert status["replays"] == 1 and status["lost_gaps"] == 0
    assert status["published_batches"] >= len(live)


REPO_SUB = HERE.parents[0] / "support" / "vllm_kv_sub.py"


def test_storage_records_and_shared_tier_discovery(server, subscribe, tmp_path) -> None:
    tier = {
        "type": "fs_native",  # the fs format, with a capacity (hence eviction)
        "base_path": str(tmp_path / "tier"),
        "max_capacity_gb": 8 * 256 / 2**20,  # eight chunks
        "eviction": {"eviction_policy": "LRU", "trigger_watermark": 0.7, "eviction_ratio": 0.5},
    }
    flags = ["--kv-events-l2", "--l2-adapter", json.dumps(tier)]
    a = server(*flags, "--kv-events-topic", "kv@a@{model}")
    b = server(*flags, "--kv-events-topic", "kv@b@{model}")
    sub = subscribe(a.pub_url, b.pub_url)
    sub.ready()
    tokens = store(a.rpc_url, 1, 3)
    want = ints(build_token_hasher("blake3", CHUNK).chunk_hashes(tokens))

    def storage_stored(endpoint: str) -> list[dict[str, Any]]:
        return stored(sub.events(endpoint), "STORAGE")

    sub.wait_for(lambda _: len(storage_stored(a.pub_url)) >= 3, "A's 3 STORAGE BlockStored")
    assert_chain(storage_stored(a.pub_url), tokens)
    assert all(row["topic"] == "kv@a@bench-model" for row in sub.batches()
               if row["endpoint"] == a.pub_url)  # fmt: skip
    assert not sub.events(b.pub_url)  # B stored nothing: it publishes nothing yet
    # B never stored these: its lookup finds them in the shared tier and says so.
    with KvhiveEngine(b.rpc_url, TINY, num_chunks=3) as eng:
        eng.register()
        assert eng.lookup("look-b", tokens) == 3  # chunks, all from L2
        eng.end_session("look-b")
    sub.wait_for(lambda _: len(storage_stored(b.pub_url)) >= 3, "B's discovered STORAGE records")
    assert_chain(storage_stored(b.pub_url), tokens)
    assert all(row["topic"] == "kv@b@bench-model" for row in sub.batches()
               if row["endpoint"] == b.pub_url)  # fmt: skip
    # Six of eight chunks pass A's watermark: its evictor removes the least recent half.
    store(a.rpc_url, 2, 3)
    sub.wait_for(lambda _: set(want) & removed_hashes(sub.events(a.pub_url), "STORAGE"),
                 "A's STORAGE BlockRemoved")  # fmt: skip
    gone = set(want) & removed_hashes(sub.events(a.pub_url), "STORAGE")
    # B's next lookup finds them vanished: B removes them from its STORAGE view too.
    with KvhiveEngine(b.rpc_url, TINY, num_chunks=3) as eng:
        eng.register()
        eng.lookup("look-b2", make_tokens(1, 3 * CHUNK))
    sub.wait_for(lambda _: gone & removed_hashes(sub.events(b.pub_url), "STORAGE"),
                 "B's STORAGE BlockRemoved of the vanished objects")  # fmt: skip
    st = b.status()
    assert st["kv_events"]["l2"] is True
    assert st["kv_publisher"]["lost_gaps"] == 0


def test_unbindable_endpoint_exits_2_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, extra in (
            ("--kv-events-endpoint", []),
            ("--kv-events-replay-endpoint", ["--kv-events-endpoint", "tcp://127.0.0.1:*"]),
        ):
            r = subprocess.run(
                [sys.executable, "-m", "kvhive", "server", "--host", "127.0.0.1",
                 "--port", str(free_port()), "--http-port", str(free_port()),
                 "--l1-size-gb", "0.0625", "--eviction-policy", "LRU", *extra,
                 flag, f"tcp://127.0.0.1:{port}"],
                capture_output=True, text=True, timeout=60, env=subprocess_env(),
            )  # fmt: skip
            assert r.returncode == 2, r.stderr[-2000:]
            last = r.stderr.strip().splitlines()[-1]
            assert last.startswith(f"kvhive server: error: {flag} tcp://127.0.0.1:{port}"), last
            assert "cannot bind" in last
