"""Dispatcher + ZMQ loop with real sockets and stand-in handlers."""

import threading
import time

import msgspec
import pytest
import zmq

from kvhive.client import KvhiveClient, RemoteError
from kvhive.client.sync import RawFrame
from kvhive.errors import BadRequest
from kvhive.server.dispatch import Dispatcher
from kvhive.server.handlers import Route
from kvhive.server.pools import AffinityPool, CpuPool
from kvhive.server.transport import ZmqServer
from kvhive.wire.ops import OPS, AfterReply

enc = msgspec.msgpack.encode


class Handlers:
    def __init__(self):
        self.gate = threading.Event()
        self.acked = threading.Event()
        self.order = []

    def table(self):
        def default(*a):
            return None

        h = {name: default for name in OPS}
        h.update(
            get_chunk_size=lambda: 256,
            noop=lambda: "OK",
            ping=lambda iid: True,
            clear=self.blocking_clear,
            lookup=self.lookup,
            store=self.store,
            commit_store=self.boom,
            register_kv_cache=self.boom,
        )
        return {name: Route(fn) for name, fn in h.items()}

    def lookup(self, key, tp):
        """Acknowledge, then finish: inline only once the client has the ack."""
        rid = key.request_id

        def rest():
            if rid == "inline":
                self.order.append(("rest", self.acked.wait(5)))
            else:
                self.order.append(("rest", rid))

        return AfterReply(None, rest)

    def blocking_clear(self, force):
        self.gate.wait(5)
        return 3

    def store(self, key, iid, blocks, ev):
        self.order.append(key["start"] if isinstance(key, dict) else key.start)
        if key.start == 999:
            raise BadRequest("bad range")
        return (b"", True)

    def boom(self, *a):
        raise RuntimeError("kaboom")


@pytest.fixture
def server():
    handlers = Handlers()
    disp = Dispatcher(handlers.table(), affinity=AffinityPool(2), cpu=CpuPool(1))
    srv = ZmqServer(["tcp://127.0.0.1:0"], disp.handle)
    srv.start()
    yield srv, handlers, disp
    handlers.gate.set()
    srv.close()


def key(start):
    return {
        "model_name": "m",
        "world_size": 1,
        "worker_id": 0,
        "token_ids": [1] * 512,
        "start": start,
        "end": start,
        "request_id": "r",
    }


def test_basic_ops_and_none_result(server):
    srv, _, _ = server
    with KvhiveClient(srv.endpoints[0]) as c:
        assert c.call("get_chunk_size") == 256
        assert c.call("noop") == "OK"
        assert c.call("ping", None) is True
        assert c.call("end_session", "r") is None
        with KvhiveClient(srv.endpoints[0], use_names=True) as named:
            assert named.call("get_chunk_size") == 256


@pytest.mark.parametrize(
    "op,args",
    [
        ("nonexistent_op", []),
        ("lookup", [key(0)]),
        ("ping", [RawFrame(b"\xc1")]),
        ("ping", ["str"]),
    ],
)
def test_malformed_requests_get_fast_error(server, op, args):
    srv, _, disp = server
    with KvhiveClient(srv.endpoints[0], timeout=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(RemoteError):
            c.call(op, *args)
        assert time.monotonic() - t0 < 1.0
        assert c.call("noop") == "OK"  # still serving
    assert sum(disp.errors.values()) >= 1


def test_unknown_legacy_id_and_short_message(server):
    srv, _, _ = server
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.connect(srv.endpoints[0])
    s.send_multipart([enc(5), enc(99)])
    assert s.poll(1000)
    uid, op, *_ = s.recv_multipart()
    assert uid == enc(5) and msgspec.msgpack.decode(op).startswith("error")
    s.send_multipart([enc(6)])  # uid without op
    assert s.poll(1000)
    assert s.recv_multipart()[0] == enc(6)
    s.send_multipart([b""])  # an empty uid still gets its error reply
    assert s.poll(1000) and s.recv_multipart()[0] == b""
    s.send_multipart([enc(7), enc(24)])
    assert s.poll(1000) and msgspec.msgpack.decode(s.recv_multipart()[2]) == "OK"
    assert srv.malformed_frames == 2
    s.close(0)


def test_handler_exceptions_become_soft_failure_or_error(server):
    srv, _, disp = server
    with KvhiveClient(srv.endpoints[0], timeout=2) as c:
        assert c.call("store", key(999), 1, [[1]], b"") == [b"", False]
        assert c.call("commit_store", key(0), 1, b"") is False
        with pytest.raises(RemoteError, match="kaboom"):
            c.call("register_kv_cache", 1, [], "m", 1, "vllm", {}, [])
    assert disp.soft_failures["store"] == 1


def test_ping_never_queues_behind_blocked_cpu_pool(server):
    srv, handlers, _ = server
    with KvhiveClient(srv.endpoints[0], timeout=5) as c:
        c.send("clear", True)  # occupies the only CPU worker
        t0 = time.monotonic()
        uid = c.send("ping", 1)
        got, value = c.recv()
        assert got == uid and value is True and time.monotonic() - t0 < 0.5
        handlers.gate.set()
        assert c.recv()[1] == 3


def test_affinity_keeps_per_connection_order(server):
    srv, handlers, _ = server
    with KvhiveClient(srv.endpoints[0], timeout=5) as c:
        for i in range(50):
            c.send("store", key(i * 256), 1, [[1]], b"")
        for _ in range(50):
            c.recv()
    assert handlers.order == [i * 256 for i in range(50)]


def test_small_lookup_runs_inline_and_large_one_on_the_pool(server):
    srv, handlers, _ = server
    big = {**key(0), "token_ids": list(range(40_000, 50_000))}
    with (
        KvhiveClient(srv.endpoints[0], timeout=5) as c,
        KvhiveClient(srv.endpoints[0], timeout=5) as other,
    ):
        other.send("clear", True)  # another client occupies the only CPU worker
        t0 = time.monotonic()
        assert c.call("lookup", key(0), 1) is None  # a few hundred bytes: answered inline
        assert c.call("query_prefetch_status", "r") is None  # always inline
        assert time.monotonic() - t0 < 0.5
        uid = c.send("lookup", big, 1)  # ~30 KB of token ids: queued behind the clear
        time.sleep(0.2)
        assert not c._sock.poll(0)
        handlers.gate.set()
        assert other.recv()[1] == 3
        assert c.recv() == (uid, None)


def test_small_lookup_never_overtakes_the_same_clients_pooled_ops(server):
    srv, handlers, disp = server
    with (
        KvhiveClient(srv.endpoints[0], timeout=5) as c,
        KvhiveClient(srv.endpoints[0], timeout=5) as other,
    ):
        first = c.send("clear", True)  # this client's op, still on the CPU pool
        second = c.send("lookup", key(0), 1)  # small, but must wait for the clear
        time.sleep(0.2)
        assert not c._sock.poll(0)
        assert other.call("lookup", key(0), 1) is None  # other clients still go inline
        handlers.gate.set()
        assert [c.recv()[0], c.recv()[0]] == [first, second]
        assert c.call("lookup", key(0), 1) is None
    assert disp._pending == {}  # every pooled job was counted out


def test_pooled_op_with_bad_arguments_gets_error_reply(server):
    srv, _, disp = server
    with (
        KvhiveClient(srv.endpoints[0], timeout=2) as c,
        pytest.raises(RemoteError, match="argument 1 is invalid"),
    ):
        c.call("store", RawFrame(b"\xc1"), 1, [[1]], b"")
    assert disp.errors


def test_after_reply_work_runs_after_the_ack_inline_and_before_it_on_a_pool(server):
    srv, handlers, _ = server
    with KvhiveClient(srv.endpoints[0], timeout=5) as c:
        assert c.call("lookup", {**key(0), "request_id": "inline"}, 1) is None
        handlers.acked.set()  # the ack arrived while its work was still waiting for it
        deadline = time.monotonic() + 5
        while not handlers.order and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handlers.order == [("rest", True)]
        big = {**key(0), "request_id": "pooled", "token_ids": list(range(40_000, 50_000))}
        assert c.call("lookup", big, 1) is None
        assert handlers.order[-1] == ("rest", "pooled")  # done before the ack was sent


def test_unregister_forgets_the_connection_binding(server):
    """After a farewell op (unregister) the affinity pool drops the connection's binding,
    so the table does not grow with every connection ever seen."""
    srv, _, disp = server
    with KvhiveClient(srv.endpoints[0]) as c:
        assert c.call("store", key(0), 1, [[1]], b"") == [b"", True]
        assert len(disp._affinity) == 1
        assert c.call("unregister_kv_cache", 1) is None
        deadline = time.monotonic() + 2
        while len(disp._affinity) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(disp._affinity) == 0


def test_too_many_outstanding_requests_get_an_immediate_error(server):
    """A connection past the outstanding limit gets error replies at once instead of more
    queued work; other connections are unaffected, and the count drains as jobs end."""
    srv, handlers, disp = server
    disp._max_outstanding = 4
    with (
        KvhiveClient(srv.endpoints[0], timeout=5) as c,
        KvhiveClient(srv.endpoints[0], timeout=5) as other,
    ):
        queued = [c.send("clear", True) for _ in range(4)]  # the first blocks the CPU pool
        over = [c.send("clear", True), c.send("store", key(0), 1, [[1]], b"")]
        for _ in over:  # answered while the four still wait
            with pytest.raises(RemoteError, match="too many outstanding requests") as err:
                c.recv()
            assert err.value.detail["code"] == "too_many_outstanding"
        assert c.call("ping", 1) is True  # inline ops are never refused
        assert other.call("store", key(0), 1, [[1]], b"") == [b"", True]
        out = disp.outstanding()
        assert out == {"limit": 4, "max": 4, "peak": 4, "connections": 1, "refused": 2}
        handlers.gate.set()
        assert [c.recv()[0] for _ in queued] == queued
        assert c.call("store", key(256), 1, [[1]], b"") == [b"", True]
    assert disp.outstanding()["max"] == 0 and disp._pending == {}


def test_exceptions_outside_handlers_still_get_a_reply(server, monkeypatch):
    """Nothing leaves the request path without a reply: a decoder that raises something
    no check foresaw becomes an internal error reply, on the loop thread and on the pools."""
    srv, _, disp = server

    def broken(spec, frames):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr("kvhive.wire.codec.decode_args", broken)
    with KvhiveClient(srv.endpoints[0], timeout=2) as c:
        for op, args in [("ping", [1]), ("clear", [True]), ("store", [key(0), 1, [[1]], b""])]:
            with pytest.raises(RemoteError, match="decoder bug"):
                c.call(op, *args)
    assert disp.errors["internal"] == 3
