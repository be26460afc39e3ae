"""The direct KV-event publisher in process: real ZMQ sockets, a real KV-event log fed
through a real bus (drained by hand), decoded with copies of vLLM's structs (map layout:
vLLM 0.32; array layout: older vLLM's ``array_like`` events).  The same publisher against a
real server and vLLM's own classes: tests/kv_events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq

from kvhive.config import KVEventsConfig
from kvhive.errors import ConfigError
from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.observability.kv_events import KVEventLog
from kvhive.observability.kv_publisher import END_SEQ, KVEventPublisher, block_hash

C = 4  # chunk size (tokens)


# ---- vLLM 0.32's structs (vllm/distributed/kv_events.py), and older vLLM's array events -----


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class OldBlockStored(OldEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class OldBlockRemoved(OldEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class OldBatch(EventBatch):
    events: list[OldBlockStored | OldBlockRemoved]


MAP = msgspec.msgpack.Decoder(KVEventBatch)


def h(i: int) -> bytes:
    return (f"hash-{i:04d}" + "x" * 22).encode()  # 32 bytes, as blake3's


TOPIC = b"kv@pod-0"  # the rig fixture's topic


class Rig:
    """A bus (drained by hand), a log and a started publisher on loopback ports."""

    def __init__(self, capacity: int = 64, **cfg: Any) -> None:
        self.bus = EventBus(max_queue_size=cfg.pop("queue", 10_000), linger_s=0)
        self.log = KVEventLog(self.bus, capacity, l2=cfg.pop("l2", False))
        conf = KVEventsConfig(
            kv_events_endpoint="tcp://127.0.0.1:*",
            kv_events_replay_endpoint="tcp://127.0.0.1:*",
            **cfg,
        )
        self.pub = KVEventPublisher(self.log, conf, block_size=C)
        self.pub.start()
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []
        self.records = 0  # records appended to the log so far (settle waits for them)

    def settle(self) -> None:
        """Wait until the publisher has sent every record (each step its own batch)."""
        _wait(lambda: self.pub.status()["published_events"] == self.records)

    def sub(self, topic: bytes = b"") -> zmq.Socket:
        s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, topic)
        s.connect(self.pub.endpoint)
        self.socks.append(s)
        time.sleep(0.2)  # PUB/SUB: the subscription must reach the publisher
        return s

    def store(self, first: int, n: int, model: str = "m", parent: bytes | None = None) -> None:
        tokens = list(range(100, 100 + (first + n) * C))
        self.bus.publish(
            ev.TokenBindings(
                chunk_hashes=[h(first + i) for i in range(n)],
                parent_hash=parent,
                tokens=tokens,
                first_token=first * C,
                chunk_size=C,
            )
        )
        keys = [ObjectKey(h(first + i), model, 0) for i in range(n)]
        self.bus.publish(ev.L1WriteFinished(keys=keys))
        self.bus.drain()
        self.records += n
        self.settle()

    def evict(self, *idx: int, model: str = "m") -> None:
        self.bus.publish(ev.L1KeysEvicted(keys=[ObjectKey(h(i), model, 0) for i in idx]))
        self.bus.drain()
        self.records += 1
        self.settle()

    def replay(self, request: list[bytes]) -> list[list[bytes]]:
        d = self.ctx.socket(zmq.DEALER)
        self.socks.append(d)
        assert self.pub.replay_endpoint is not None
        d.connect(self.pub.replay_endpoint)
        d.send_multipart(request)
        out = []
        while d.poll(5000):
            frames = d.recv_multipart()
            out.append(frames)
            if frames[2] == END_SEQ:
                return out
        raise AssertionError(f"no end marker; got {out}")

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()
        self.pub.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(kv_events_topic=TOPIC.decode())
    yield r
    r.close()


def recv(sock: zmq.Socket, n: int) -> list[tuple[bytes, int, bytes]]:
    out = []
    for _ in range(n):
        assert sock.poll(5000), f"only {len(out)} of {n} messages"
        topic, seq, payload = sock.recv_multipart()
        out.append((topic, int.from_bytes(seq, "big"), payload))
    return out


def test_block_hash_is_vllms_conversion() -> None:
    raw = bytes(range(32))
    assert block_hash(raw) == int.from_bytes(raw, "big") & (2**64 - 1)
    assert block_hash(raw) == int.from_bytes(raw[-8:], "big")


def test_stored_and_removed_in_vllms_map_layout(rig: Rig) -> None:
    sub = rig.sub()
    rig.store(0, 2)
    rig.evict(0, 1)
    (t0, s0, p0), (t1, s1, p1) = recv(sub, 2)
    assert (t0, s0, t1, s1) == (TOPIC, 0, TOPIC, 1)
    first, second = MAP.decode(p0), MAP.decode(p1)
    assert first.data_parallel_rank == 0 and abs(first.ts - time.time()) < 60
    assert first.events == [
        BlockStored([block_hash(h(0))], None, [100, 101, 102, 103], C, None, "CPU", None),
        BlockStored([block_hash(h(1))], block_hash(h(0)), [104, 105, 106, 107], C, None, "CPU",
                    None),
    ]  # fmt: skip
    assert second.events == [BlockRemoved([block_hash(h(0)), block_hash(h(1))], "CPU")]
    # exactly vLLM's map: every non-default field, in vLLM's order
    raw = msgspec.msgpack.decode(p0)
    assert list(raw[1][0]) == ["type", "block_hashes", "parent_block_hash", "token_ids",
                               "block_size", "lora_id", "medium", "lora_name"]  # fmt: skip
    assert rig.pub.status()["published_events"] == 3


def test_array_layout_decodes_with_array_like_structs() -> None:
    r = Rig(kv_events_layout="array")
    try:
        sub = r.sub()
        r.store(0, 1)
        r.evict(0)
        (_, _, p0), (_, _, p1) = recv(sub, 2)
        old = msgspec.msgpack.Decoder(OldBatch)
        assert old.decode(p0).events == [
            OldBlockStored([block_hash(h(0))], None, [100, 101, 102, 103], C, None, "CPU", None)
        ]
        assert old.decode(p1).events == [OldBlockRemoved([block_hash(h(0))], "CPU")]
        assert msgspec.msgpack.decode(p0)[1][0][0] == "BlockStored"
    finally:
        r.close()


def test_model_topics_one_batch_per_model() -> None:
    r = Rig(kv_events_topic="kv@pod-1@{model}")
    try:
        sub = r.sub(b"kv@pod-1@")
        r.bus.publish(ev.TokenBindings(chunk_hashes=[h(0)], parent_hash=None,
                                       tokens=[1, 2, 3, 4], first_token=0, chunk_size=C))  # fmt: skip
        r.bus.publish(ev.L1WriteFinished(keys=[ObjectKey(h(0), "a", 0), ObjectKey(h(0), "b", 0)]))
        r.bus.drain()
        got = recv(sub, 2)
        assert sorted((t, s) for t, s, _ in got) == [(b"kv@pod-1@a", 0), (b"kv@pod-1@b", 1)]
        for _, _, payload in got:
            assert len(MAP.decode(payload).events) == 1
    finally:
        r.close()


def test_a_late_subscriber_fills_its_gap_from_replay(rig: Rig) -> None:
    early = rig.sub()
    rig.store(0, 1)
    rig.store(1, 1, parent=h(0))
    recv(early, 2)
    late = rig.sub()
    rig.store(2, 1, parent=h(1))
    ((_, seq, payload),) = recv(late, 1)
    assert seq == 2  # missed 0 and 1: a gap
    frames = rig.replay([b"", (0).to_bytes(8, "big")])
    # vLLM 0.32's replay framing: [b"", topic, seq, payload]; the end marker has no topic
    assert [(f[0], f[1]) for f in frames] == [(b"", TOPIC)] * 3 + [(b"", b"")]
    assert [int.from_bytes(f[2], "big", signed=True) for f in frames] == [0, 1, 2, -1]
    assert frames[2][3] == payload and frames[3][3] == b""
    assert MAP.decode(frames[0][3]).events[0].block_hashes == [block_hash(h(0))]
    assert rig.pub.status()["replays"] == 1


def test_malformed_replay_requests_get_only_the_end_marker(rig: Rig) -> None:
    rig.store(0, 1)
    for bad in ([b"", b"\x01"], [b"x", (0).to_bytes(8, "big")], [b"", b"", b""]):
        assert rig.replay(bad) == [[b"", b"", END_SEQ, b""]]
    assert rig.pub.status()["malformed_replays"] == 3
    assert len(rig.replay([b"", (0).to_bytes(8, "big")])) == 2  # still serving


def test_replay_buffer_keeps_the_newest_batches() -> None:
    r = Rig(kv_events_buffer_steps=2)
    try:
        for i in range(4):
            r.store(i, 1)
        frames = r.replay([b"", (0).to_bytes(8, "big")])
        assert [int.from_bytes(f[2], "big", signed=True) for f in frames] == [2, 3, -1]
    finally:
        r.close()


def test_records_the_log_lost_leave_a_gap_replay_cannot_fill() -> None:
    r = Rig(capacity=64, queue=2)
    try:
        sub = r.sub()
        r.store(0, 1)
        # three events into a two-event queue: the bus drops one, the log marks the loss
        r.bus.publish(ev.TokenBindings(chunk_hashes=[h(1)], parent_hash=None,
                                       tokens=[1, 2, 3, 4], first_token=0, chunk_size=C))  # fmt: skip
        r.bus.publish(ev.L1WriteFinished(keys=[ObjectKey(h(1), "m", 0)]))
        r.bus.publish(ev.L1KeysEvicted(keys=[ObjectKey(h(0), "m", 0)]))
        r.bus.drain()
        r.records += 1
        r.store(2, 1)
        seqs = [s for _, s, _ in recv(sub, 3)]
        assert seqs == [0, 1, 3]  # the eviction was dropped: sequence 2 skipped for it
        frames = r.replay([b"", (2).to_bytes(8, "big")])
        assert int.from_bytes(frames[0][2], "big", signed=True) == 3  # 2 never existed
        assert r.pub.status()["lost_gaps"] == 1
    finally:
        r.close()


def test_unbindable_endpoints_name_their_flag() -> None:
    bus = EventBus(max_queue_size=10, linger_s=0)
    log = KVEventLog(bus, 8)
    first = KVEventPublisher(
        log, KVEventsConfig(kv_events_endpoint="tcp://127.0.0.1:*"), block_size=C
    )
    try:
        taken = first.endpoint
        with pytest.raises(ConfigError) as err:
            KVEventPublisher(log, KVEventsConfig(kv_events_endpoint=taken), block_size=C)
        assert err.value.flag == "--kv-events-endpoint" and "cannot bind" in err.value.message
        cfg = KVEventsConfig(kv_events_endpoint="tcp://127.0.0.1:*",
                             kv_events_replay_endpoint=taken)  # fmt: skip
        with pytest.raises(ConfigError) as err:
            KVEventPublisher(log, cfg, block_size=C)
        assert err.value.flag == "--kv-events-replay-endpoint"
    finally:
        first.close()
    # closed: the endpoint is free again
    again = KVEventPublisher(log, KVEventsConfig(kv_events_endpoint=taken), block_size=C)
    again.close()


def test_a_disabled_log_refuses_the_publisher() -> None:
    log = KVEventLog(EventBus(max_queue_size=10, linger_s=0), 0)
    with pytest.raises(ConfigError) as err:
        KVEventPublisher(log, KVEventsConfig(kv_events_endpoint="tcp://127.0.0.1:*"), block_size=C)
    assert err.value.flag == "--kv-events-endpoint"


def test_metrics_families(rig: Rig) -> None:
    rig.store(0, 1)
    values = {m.name: m.samples[0].value for m in rig.pub.metrics()}
    assert values["kvhive_kv_events_published_batches"] == 1
    assert values["kvhive_kv_events_published_events"] == 1
    assert values["kvhive_kv_events_lost_gaps"] == 0
    assert values["kvhive_kv_events_buffered_batches"] == 1


def _wait(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
