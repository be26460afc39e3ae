"""``subscribe_kv_events`` on a real server, driven by a raw DEALER (protocol.md §2.4).

Frames as LMCache 0.5.6's MQ client sends them: ``[uid | op | instance | model | cursor |
max_events]`` to subscribe, ``[uid | b"" | b"ack"]`` per batch received, ``[uid | b"" |
b"cancel"]`` to stop; the server sends ``[uid | op | batch]`` per credit and ``[uid | op]`` at
the end.  Records come from the real store path: the engine's token bindings and L1 commits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from kvhive.server.core import KvhiveServer
from kvhive.server.streams import MAX_STREAMS_PER_CONNECTION
from kvhive.storage.owners import WriterOwner
from kvhive.wire import types as t
from support.servers import running_server

enc = msgspec.msgpack.encode
OP = enc("subscribe_kv_events")
C = 256  # the server's chunk size
TOKENS = list(range(7, 7 + 4 * C))


class Dealer:
    def __init__(self, url: str) -> None:
        self.s = zmq.Context.instance().socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(url)

    def subscribe(self, uid: int, instance: int = 7, model: str = "m", cursor=0, max_events=1024):
        self.s.send_multipart(
            [enc(uid), OP, enc(instance), enc(model), enc(cursor), enc(max_events)]
        )

    def control(self, uid: int, action: bytes) -> None:
        self.s.send_multipart([enc(uid), b"", action])

    def recv(self, timeout_ms: int = 3000) -> list[bytes] | None:
        return self.s.recv_multipart() if self.s.poll(timeout_ms) else None

    def batch(self, uid: int, timeout_ms: int = 3000) -> t.KVEventBatch:
        msg = self.recv(timeout_ms)
        assert msg is not None, "no batch"
        assert msg[:2] == [enc(uid), OP] and len(msg) == 3, msg
        return msgspec.msgpack.decode(msg[2], type=t.KVEventBatch)

    def call(self, uid: int, op: str, *args) -> list[bytes]:
        self.s.send_multipart([enc(uid), enc(op), *(enc(a) for a in args)])
        msg = self.recv()
        assert msg is not None
        return msg


@contextlib.contextmanager
def served(*flags: str) -> Iterator[tuple[KvhiveServer, Dealer]]:
    with running_server(*flags) as srv:
        d = Dealer(srv.zmq.endpoints[0])
        try:
            yield srv, d
        finally:
            d.s.close()


def key(start: int, end: int, rid: str = "r1") -> t.CacheKey:
    return t.CacheKey(
        model_name="m", world_size=1, worker_id=0, token_ids=TOKENS, start=start, end=end,
        request_id=rid,
    )  # fmt: skip


def store(srv: KvhiveServer, start: int, end: int) -> list[bytes]:
    """What a store of [start, end) does to L1 and the bus: bind tokens, reserve, commit."""
    k = key(start, end)
    tx = srv.engine.transfers
    tx.bind_tokens(k)
    keys = tx.chunk_keys(k, 0x01000100)
    slots = srv.l1.reserve(keys, 4096, WriterOwner(1))
    assert all(srv.l1.commit([s for s in slots if s is not None]))
    assert srv.obs.bus.flush()  # the log has the records
    return [o.chunk_hash for o in keys]


def test_capability_is_advertised():
    with served() as (_, d):
        assert msgspec.msgpack.decode(d.call(1, "get_experimental")[2]) == ["kv_event_stream"]


def test_first_batch_at_once_then_batches_per_credit():
    with served() as (srv, d):
        d.subscribe(1)
        first = d.batch(1)
        assert first.enabled and not first.lost and first.events == [] and first.next_cursor == 0
        assert first.incarnation == srv.engine.kv_events.incarnation
        assert d.recv(300) is None  # nothing more without records
        h1 = store(srv, 0, 2 * C)
        assert d.recv(300) is None  # records, but no credit yet
        d.control(1, b"ack")
        b = d.batch(1)
        assert [(r.kind, r.block_hashes, r.parent_block_hash) for r in b.events] == [
            ("stored", [h1[0]], None),
            ("stored", [h1[1]], h1[0]),
        ]
        assert b.events[1].token_ids == TOKENS[C : 2 * C] and b.next_cursor == 2
        d.control(1, b"ack")
        h2 = store(srv, 2 * C, 4 * C)  # a later step of the request: parent from the session
        b = d.batch(1)
        assert [r.parent_block_hash for r in b.events] == [h1[1], h2[0]]
        d.control(1, b"ack")
        srv.engine.clear(False)
        b = d.batch(1)
        assert [(r.kind, r.block_hashes) for r in b.events] == [("removed", h1 + h2)]
        assert srv.status()["transport"]["streams"]["open"] == 1


def test_a_client_that_never_acks_holds_one_batch():
    with served() as (srv, d):
        d.subscribe(1)
        d.batch(1)
        store(srv, 0, C)
        srv.engine.clear(False)
        store(srv, 0, C)
        assert d.recv(400) is None
        streams = srv.status()["transport"]["streams"]
        assert streams["batches_sent"] == 1 and streams["open"] == 1
        d.control(1, b"ack")  # everything since, in one batch
        assert [r.kind for r in d.batch(1).events] == ["stored", "removed", "stored"]


def test_cancel_ends_the_stream():
    with served() as (srv, d):
        d.subscribe(5)
        d.batch(5)
        d.control(5, b"cancel")
        assert d.recv() == [enc(5), OP]
        assert srv.engine.kv_events.status()["subscribers"] == 0
        d.control(5, b"ack")  # unknown stream now: ignored, the server still serves
        assert d.call(6, "ping", None)[:2] == [enc(6), enc("ping")]


def test_a_new_subscription_of_the_instance_ends_the_old_one():
    with served() as (srv, d):
        d.subscribe(1, instance=9)
        d.batch(1)
        other = Dealer(srv.zmq.endpoints[0])
        try:
            other.subscribe(1, instance=9)  # same uid, another connection: its own stream
            other.batch(1)
            assert d.recv() == [enc(1), OP]  # the old one ends
            d.subscribe(2, instance=10)  # other instances are independent
            d.batch(2)
            assert other.recv(300) is None
            assert srv.engine.kv_events.status()["subscribers"] == 2
        finally:
            other.s.close()


@pytest.mark.parametrize(("cursor", "max_events"), [(-1, 10), (0, 0), (0, 1025)])
def test_bad_arguments_get_an_error_reply(cursor, max_events):
    with served() as (srv, d):
        d.subscribe(3, cursor=cursor, max_events=max_events)
        msg = d.recv()
        assert msg is not None and msg[0] == enc(3)
        assert msgspec.msgpack.decode(msg[1]).startswith("error: bad_request: subscribe_kv_events")
        assert srv.status()["transport"]["streams"]["open"] == 0


def test_wrong_argument_count_and_types_get_an_error_reply():
    with served() as (_, d):
        d.s.send_multipart([enc(3), OP, enc(7), enc("m"), enc(0)])
        assert msgspec.msgpack.decode(d.recv()[1]).startswith("error: protocol:")
        d.s.send_multipart([enc(4), OP, enc("x"), enc("m"), enc(0), enc(1)])
        assert msgspec.msgpack.decode(d.recv()[1]).startswith("error: protocol:")


def test_a_replay_starts_after_the_cursor():
    with served() as (srv, d):
        hashes = store(srv, 0, 3 * C)
        d.subscribe(1, cursor=1, max_events=1)
        b = d.batch(1)
        assert [r.block_hashes for r in b.events] == [[hashes[1]]] and b.next_cursor == 2
        d.control(1, b"ack")
        assert [r.block_hashes for r in d.batch(1).events] == [[hashes[2]]]


def test_log_size_zero_disables_the_channel():
    with served("--kv-event-log-size", "0") as (_, d):
        assert msgspec.msgpack.decode(d.call(1, "get_experimental")[2]) == []
        d.subscribe(2)
        b = d.batch(2)
        assert not b.enabled and b.events == []
        assert d.recv(300) is None  # the end waits for the ack of the status batch
        d.control(2, b"ack")
        assert d.recv() == [enc(2), OP]


def test_disabled_observability_disables_the_channel():
    with served("--disable-observability") as (_, d):
        assert msgspec.msgpack.decode(d.call(1, "get_experimental")[2]) == []


def test_shutdown_ends_open_streams():
    with served() as (srv, d):
        d.subscribe(1)
        d.batch(1)
        srv.close()
        assert d.recv() == [enc(1), OP]


def test_a_connection_has_a_bounded_number_of_streams():
    with served() as (_, d):
        for uid in range(MAX_STREAMS_PER_CONNECTION):
            d.subscribe(uid, instance=1000 + uid)
            d.batch(uid)
        d.subscribe(999, instance=5)
        msg = d.recv()
        assert msg is not None and msg[0] == enc(999)
        assert msgspec.msgpack.decode(msg[1]).startswith("error: too_many_outstanding:")
        d.control(0, b"cancel")
        assert d.recv() == [enc(0), OP]
        d.subscribe(999, instance=5)
        assert d.batch(999).enabled
