"""The routing example's KV index and event decoding (``examples/router``), without vLLM:
content hashing across replicas, removals by engine id, gaps and replay, longest prefix,
the policy (KV match, least-loaded fallback, overload, round-robin)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "router"))
from route_events import Batch, Source, Subscriber, decode_batch
from route_index import Cleared, KvIndex, Removed, Stored, prefix_hashes
from route_policy import Replica, Router

BS = 4
TOKENS = list(range(100, 124))  # six blocks of 4


def stored(ids: list[int], parent: int | None, start: int, n: int, medium: str = "CPU") -> Stored:
    """``n`` blocks of TOKENS from block ``start`` under engine ids ``ids``."""
    toks = tuple(TOKENS[start * BS : (start + n) * BS])
    return Stored(tuple(ids), parent, toks, BS, medium)


def test_same_content_same_own_hash_whatever_the_engine_ids() -> None:
    idx = KvIndex()
    idx.apply("a", [stored([11, 12, 13], None, 0, 3)])
    idx.apply("b", [stored([901], None, 0, 1), stored([902, 903], 901, 1, 2)])
    m = idx.match(["a", "b"], [*TOKENS, 7, 7])
    assert m.local_tokens == {"a": 12, "b": 12}
    assert idx.size() == {"a/CPU": 3, "b/CPU": 3}
    assert prefix_hashes(TOKENS, BS, 2) == prefix_hashes(TOKENS[:8], BS)


def test_longest_prefix_stops_at_the_first_missing_block() -> None:
    idx = KvIndex()
    idx.apply("a", [stored([1, 2], None, 0, 2)])
    idx.apply("b", [stored([5, 6, 7, 8], None, 0, 4)])
    assert idx.match(["a", "b"], TOKENS).local_tokens == {"a": 8, "b": 16}
    other = [0, *TOKENS[1:]]  # first block differs: nothing matches
    assert idx.match(["a", "b"], other).local_tokens == {"a": 0, "b": 0}
    idx.apply("b", [Removed((6,), "CPU")])  # a hole in b's chain at block 1
    assert idx.match(["a", "b"], TOKENS).local_tokens == {"a": 8, "b": 4}


def test_removal_is_per_medium_and_storage_does_not_tell_replicas_apart() -> None:
    idx = KvIndex()
    idx.apply("a", [stored([1, 2], None, 0, 2), stored([1, 2], None, 0, 2, "STORAGE")])
    m = idx.match(["a", "b"], TOKENS)
    assert (m.local_tokens, m.storage_tokens) == ({"a": 8, "b": 0}, 8)
    idx.apply("a", [Removed((1, 2), "CPU")])
    m = idx.match(["a", "b"], TOKENS)
    assert (m.local_tokens, m.storage_tokens) == ({"a": 0, "b": 0}, 8)
    idx.apply("a", [Removed((1, 2), "STORAGE"), Removed((77,), "CPU")])
    assert idx.match(["a"], TOKENS).storage_tokens == 0
    assert idx.size() == {}
    assert (idx.counters.removed_blocks, idx.counters.unknown_removals) == (4, 1)


def test_unknown_parent_is_an_orphan_and_clear_forgets_one_replica() -> None:
    idx = KvIndex()
    idx.apply("a", [stored([3], 2, 2, 1)])  # parent 2 never announced
    assert idx.counters.orphan_blocks == 1 and idx.size() == {}
    idx.apply("a", [stored([1], None, 0, 1)])
    idx.apply("b", [stored([1], None, 0, 1)])
    idx.apply("a", [Cleared()])
    assert idx.match(["a", "b"], TOKENS).local_tokens == {"a": 0, "b": 4}


def test_predictions_count_until_they_expire() -> None:
    idx = KvIndex(block_sizes={BS}, predict_ttl_s=10.0)
    idx.predict("b", TOKENS[:8], now=100.0)
    m = idx.match(["a", "b"], TOKENS, now=105.0)
    assert (m.local_tokens, m.predicted_tokens) == ({"a": 0, "b": 8}, {"a": 0, "b": 8})
    idx.apply("b", [stored([1], None, 0, 1)])  # events confirm block 0
    assert idx.match(["b"], TOKENS, now=105.0).predicted_tokens == {"b": 4}
    assert idx.match(["a", "b"], TOKENS, now=111.0).local_tokens == {"a": 0, "b": 4}


def _router(**kw: object) -> Router:
    return Router([Replica("a", "http://a"), Replica("b", "http://b")], **kw)  # type: ignore[arg-type]


def test_kv_policy_prefers_the_holder_and_falls_back_to_the_least_loaded() -> None:
    router = _router(max_imbalance=2)
    src = Source("b", "tcp://b:5557")
    router.on_batch(src, Batch(0.0, (stored([1, 2], None, 0, 2),), None))
    first = router.choose([9, 9, 9, 9, 9])  # nothing held: the least loaded (a tie: a)
    assert (first.name, router.decisions[-1].reason) == ("a", "least_loaded")
    assert router.choose([9, 9, 9, 9, 9]).name == "b"  # now b has fewer in flight
    router.done(first)  # a: 0, b: 1 in flight
    got = router.choose(TOKENS)  # b holds 8 tokens: b, though busier
    assert (got.name, router.decisions[-1].reason, router.decisions[-1].matched_tokens) == (
        "b", "kv_match", 8)  # fmt: skip
    got = router.choose(TOKENS)  # b is now 2 busier than a: overloaded
    assert (got.name, router.decisions[-1].reason) == ("a", "overloaded")
    stats = router.stats({"batches": 1})
    assert stats["events"] == {"b": {"BlockStored/CPU": 1, "blocks/4": 2}}
    assert stats["events_by_source"] == {"b tcp://b:5557": 1}
    assert stats["by_reason"] == {"least_loaded": 2, "kv_match": 1, "overloaded": 1}
    router.on_stale(src, "gap")
    assert router.index.size() == {} and router.stats()["stale"] == {"b": 1}


def test_round_robin_ignores_the_index_and_reset_zeroes_stats() -> None:
    router = _router(policy="round_robin")
    router.on_batch(Source("b", "e"), Batch(0.0, (stored([1], None, 0, 1),), None))
    assert [router.choose(TOKENS).name for _ in range(3)] == ["a", "b", "a"]
    assert router.decisions[0].matched_tokens == 0 and router.decisions[1].matched_tokens == 4
    router.reset()
    assert router.stats()["decisions"] == 0 and router.choose(TOKENS).name == "a"


def _payload(events: list[object]) -> bytes:
    return msgspec.msgpack.encode([1.5, events, None])


def test_decode_map_and_array_events() -> None:
    batch = decode_batch(_payload([
        {"type": "BlockStored", "block_hashes": [2**64 - 1], "parent_block_hash": None,
         "token_ids": [1, 2, 3, 4], "block_size": 4, "lora_id": None, "medium": "CPU"},
        ["BlockRemoved", [5], "GPU"],
        {"type": "AllBlocksCleared"},
        {"type": "SomethingNew"},
    ]))  # fmt: skip
    assert batch.ts == 1.5 and batch.dp_rank is None
    assert batch.events == (
        Stored((2**64 - 1,), None, (1, 2, 3, 4), 4, "CPU"),
        Removed((5,), "GPU"),
        Cleared(),
    )
    with pytest.raises(ValueError, match="KVEventBatch"):
        decode_batch(msgspec.msgpack.encode({"not": "a batch"}))


class _Publisher:
    """A vLLM-like publisher: PUB socket plus a ROUTER replay socket over its buffer
    (answers ``[id, b"", topic, seq, payload]`` then ``[id, b"", b"", -1, b""]``)."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay_port = self.replay.bind_to_random_port("tcp://127.0.0.1")
        self.buffer: list[tuple[int, bytes]] = []
        self.replays = 0

    def publish(self, seq: int, payload: bytes, *, send: bool = True) -> None:
        self.buffer.append((seq, payload))
        if send:
            self.pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])

    def serve_replay(self) -> None:
        while self.replay.poll(0):
            ident, _, start = self.replay.recv_multipart()
            self.replays += 1
            for seq, buf in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    self.replay.send_multipart([ident, b"", b"kv", seq.to_bytes(8, "big"), buf])
            self.replay.send_multipart([ident, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])


def _block(i: int) -> bytes:
    """Block ``i`` of TOKENS, engine id ``i + 1``, chained to block ``i - 1``."""
    return _payload([{"type": "BlockStored", "block_hashes": [i + 1],
                      "parent_block_hash": i or None, "token_ids": TOKENS[i * BS : (i + 1) * BS],
                      "block_size": BS, "medium": "CPU"}])  # fmt: skip


def _until(cond: object, pub: _Publisher | None = None, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pub is not None:
            pub.serve_replay()
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize("with_replay", [True, False])
def test_gap_is_replayed_or_marks_the_index_stale(with_replay: bool) -> None:
    ctx = zmq.Context.instance()
    pub = _Publisher(ctx)
    idx = KvIndex()
    lock = threading.Lock()
    stale: list[str] = []

    def on_batch(src: Source, batch: object) -> None:
        with lock:
            idx.apply(src.replica, batch.events)  # type: ignore[attr-defined]

    replay = f"tcp://127.0.0.1:{pub.replay_port}" if with_replay else None
    sub = Subscriber([Source("a", f"tcp://127.0.0.1:{pub.pub_port}", replay, "kv")],
                     on_batch, lambda src, why: (stale.append(why), idx.clear(src.replica)),
                     replay_timeout_s=2.0)  # fmt: skip
    sub.start()
    try:
        seq = 0
        # until the SUB is joined (slow joiner): block 0 again and again, seq rising
        while idx.match(["a"], TOKENS).local_tokens["a"] < BS:
            pub.publish(seq, _block(0))
            seq += 1
            _until(lambda: True, pub)
            time.sleep(0.05)
        pub.publish(seq, _block(1), send=False)  # lost on the wire
        pub.publish(seq + 1, _block(2))
        if with_replay:
            _until(lambda: idx.match(["a"], TOKENS).local_tokens["a"] == 3 * BS, pub)
            assert not stale and sub.counters["gaps"] == 1
        else:
            _until(lambda: stale, pub)
            assert "no replay endpoint" in stale[0]
            # the index was cleared: block 2's parent is unknown, nothing matches
            _until(lambda: idx.counters.orphan_blocks == 1)
            assert idx.match(["a"], TOKENS).local_tokens["a"] == 0
    finally:
        sub.stop()
        sub.join(5)
        pub.pub.close(linger=0)
        pub.replay.close(linger=0)
