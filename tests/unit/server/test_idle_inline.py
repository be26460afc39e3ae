"""Small transfers of an idle server run on the loop thread; anything else, or a busy
server, goes to the pools in order (real sockets, stand-in handlers)."""

from __future__ import annotations

import threading
import time

import pytest

from kvhive.client import KvhiveClient
from kvhive.errors import BadRequest
from kvhive.server.dispatch import Dispatcher
from kvhive.server.handlers import Route
from kvhive.server.pools import AffinityPool, CpuPool
from kvhive.server.transport import ZmqServer
from kvhive.wire.ops import OPS

LOOP = "kvhive-zmq-loop"
BIG = 1000  # a store starting at or past this token is "not small"
SLOW = 2000  # ... and one starting here takes a while
REFUSED = 777  # the small-work check cannot read it; the handler refuses it


class Stand:
    """Stand-in handlers recording where each store ran."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.ran: list[tuple[int, str]] = []
        self.srv: ZmqServer | None = None
        self.saw_backlog: list[bool] = []

    def store(self, key, iid, blocks, ev):
        if key.start == SLOW:
            time.sleep(0.2)
        if key.start == REFUSED:
            raise BadRequest("refused range")
        self.ran.append((key.start, threading.current_thread().name))
        return (b"", True)

    @staticmethod
    def small(key, iid, *rest):
        if key.start == REFUSED:
            raise ValueError("cannot read this key")
        return key.start < BIG

    def clear(self, force):
        self.gate.wait(5)
        return 0

    def noop(self):
        """On the loop thread: wait (bounded) until another message waits behind this one."""
        assert self.srv is not None
        deadline = time.monotonic() + 2
        seen = self.srv.backlog()
        while not seen and self.want_backlog and time.monotonic() < deadline:
            time.sleep(0.005)
            seen = self.srv.backlog()
        self.saw_backlog.append(seen)
        return "OK"

    want_backlog = False

    def routes(self):
        table = {name: Route(lambda *a: None) for name in OPS}
        table["store"] = Route(self.store, small=self.small)
        table["retrieve"] = Route(lambda *a: (b"", True), small=self.small)
        table["clear"] = Route(self.clear)
        table["noop"] = Route(self.noop)
        return table


@pytest.fixture
def served():
    stand = Stand()
    disp = Dispatcher(stand.routes(), affinity=AffinityPool(2), cpu=CpuPool(1))
    srv = ZmqServer(["tcp://127.0.0.1:0"], disp.handle, streams=disp.streams)
    disp.watch_backlog(srv.backlog)
    stand.srv = srv
    srv.start()
    yield srv, stand, disp
    stand.gate.set()
    srv.close()


def key(start, tokens=4096):
    return {
        "model_name": "m",
        "world_size": 1,
        "worker_id": 0,
        "token_ids": [1] * tokens,
        "start": start,
        "end": start,
        "request_id": "r",
    }


def test_a_small_transfer_of_an_idle_server_runs_on_the_loop_thread(served):
    srv, stand, disp = served
    with KvhiveClient(srv.endpoints[0]) as c:
        assert c.call("store", key(0), 1, [[1]], b"") == [b"", True]
        assert c.call("retrieve", key(0), 1, [[1]], b"", 0) == [b"", True]
        assert c.call("store", key(BIG), 1, [[1]], b"") == [b"", True]
    assert stand.ran[0] == (0, LOOP)
    assert stand.ran[1][0] == BIG and stand.ran[1][1].startswith("kvhive-aff")
    assert disp.idle_inline == 2
    assert disp.outstanding()["idle_inline"] == 2
    # Decoded once each, whether run inline or handed to the pool with its values.
    assert disp.stats()["requests"] == {"store": 2, "retrieve": 1}


def test_large_arguments_are_not_decoded_on_the_loop_thread(served):
    """A request whose argument frames exceed the op's cap goes to the pool undecoded."""
    srv, stand, disp = served
    with KvhiveClient(srv.endpoints[0]) as c:
        assert c.call("store", key(0, tokens=20_000), 1, [[1]], b"") == [b"", True]
    assert stand.ran[0][1].startswith("kvhive-aff")
    assert disp.idle_inline == 0


def test_a_check_that_cannot_read_the_request_leaves_it_to_its_handler(served):
    srv, _, disp = served
    with KvhiveClient(srv.endpoints[0]) as c:
        assert c.call("store", key(REFUSED), 1, [[1]], b"") == list(OPS["store"].soft)
    assert disp.idle_inline == 0
    assert disp.stats()["soft_failures"] == {"store": 1}


def test_a_busy_server_keeps_small_transfers_on_the_pools_in_order(served):
    """Pooled work anywhere (another client's blocked clear) or earlier work of the same
    connection: a small store is queued behind it, never run ahead of it."""
    srv, stand, disp = served
    with (
        KvhiveClient(srv.endpoints[0], timeout=5) as c,
        KvhiveClient(srv.endpoints[0], timeout=5) as other,
    ):
        blocked = other.send("clear", True)
        deadline = time.monotonic() + 2
        while not disp.outstanding()["connections"] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert c.call("store", key(0), 1, [[1]], b"") == [b"", True]
        assert stand.ran[-1][1].startswith("kvhive-aff")
        stand.gate.set()
        assert other.recv()[0] == blocked
        # Same connection: the slow pooled store first, then a small one sent right after.
        first = c.send("store", key(SLOW), 1, [[1]], b"")
        second = c.send("store", key(1), 1, [[1]], b"")
        assert [c.recv()[0] for _ in range(2)] == [first, second]
    assert [s for s, _ in stand.ran[-2:]] == [SLOW, 1]
    assert all(name.startswith("kvhive-aff") for _, name in stand.ran)
    assert disp.idle_inline == 0


def test_backlog_tells_whether_a_message_waits_behind_the_current_one(served):
    srv, stand, _ = served
    with KvhiveClient(srv.endpoints[0], timeout=5) as c:
        assert c.call("noop") == "OK"  # alone: nothing waits
        stand.want_backlog = True
        first = c.send("noop")
        second = c.send("ping", 1)
        assert [c.recv()[0] for _ in range(2)] == [first, second]
    assert stand.saw_backlog == [False, True]


def test_a_small_transfer_behind_a_waiting_message_goes_to_the_pool():
    """With a backlog, even an idle server hands a small transfer to its pool."""
    stand = Stand()
    disp = Dispatcher(stand.routes(), affinity=AffinityPool(1), cpu=CpuPool(1))
    srv = ZmqServer(["tcp://127.0.0.1:0"], disp.handle, streams=disp.streams)
    disp.watch_backlog(lambda: True)
    srv.start()
    try:
        with KvhiveClient(srv.endpoints[0]) as c:
            assert c.call("store", key(0), 1, [[1]], b"") == [b"", True]
        assert stand.ran[0][1].startswith("kvhive-aff")
        assert disp.idle_inline == 0
    finally:
        srv.close()
