"""StreamManager: credits, end frames, kept-back batches, silent connections (no sockets)."""

from __future__ import annotations

from collections.abc import Callable

from kvhive.server.streams import (
    MAX_STREAMS_PER_CONNECTION,
    Peer,
    Sent,
    StreamManager,
    StreamSource,
)

OP = b"\xb3subscribe_kv_events"


class FakePeer:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.result = Sent.SENT

    def __call__(self, parts: list[bytes]) -> None:
        raise AssertionError("streams send with send_now")

    def send_now(self, parts: list[bytes]) -> Sent:
        if self.result is Sent.SENT:
            self.sent.append(parts)
        return self.result


class FakeSource:
    """Hands out queued payloads; ``sent()`` confirms the last one."""

    def __init__(self, *payloads: bytes) -> None:
        self.queue = list(payloads)
        self.delivered: list[bytes] = []
        self.closed = False
        self.close_calls = 0
        self.wake: Callable[[], None] | None = None
        self.boom = False

    def attach(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    def poll(self) -> bytes | None:
        if self.boom:
            raise RuntimeError("broken source")
        return self.queue[0] if self.queue else None

    def sent(self) -> None:
        self.delivered.append(self.queue.pop(0))

    def close(self) -> None:
        self.closed = True
        self.close_calls += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(*payloads: bytes, idle: float = 60.0):
    clock = Clock()
    m = StreamManager(idle_close_s=idle, clock=clock)
    wakes: list[int] = []
    m.attach(lambda: wakes.append(1))
    peer, src = FakePeer(), FakeSource(*payloads)
    m.open(b"id", b"u1", OP, src, peer)
    return m, peer, src, clock, wakes


def test_fakes_satisfy_the_protocols():
    assert isinstance(FakePeer(), Peer) and isinstance(FakeSource(), StreamSource)


def test_first_batch_at_once_then_one_per_ack():
    m, peer, src, _, wakes = opened(b"a", b"b", b"c")
    assert peer.sent == [[b"u1", OP, b"a"]]
    m.pump()  # no credit: nothing
    assert len(peer.sent) == 1
    m.control(b"id", b"u1", [b"ack"])
    assert peer.sent[-1] == [b"u1", OP, b"b"]
    m.control(b"id", b"u1", [b"ack"])
    m.control(b"id", b"u1", [b"ack"])  # a second ack with nothing pending: harmless
    assert src.delivered == [b"a", b"b", b"c"]
    assert src.wake is not None
    src.wake()
    assert wakes == [1]
    assert m.stats()["batches_sent"] == 3 and m.stats()["acks"] == 3


def test_credit_waits_for_a_batch_that_arrives_later():
    m, peer, src, _, _ = opened()
    assert peer.sent == []  # nothing yet (the kv-event source always has a first batch)
    src.queue.append(b"x")
    m.pump()
    assert peer.sent == [[b"u1", OP, b"x"]]


def test_cancel_sends_the_end_frame_and_closes_the_source():
    m, peer, src, _, _ = opened(b"a")
    m.control(b"id", b"u1", [b"cancel"])
    assert peer.sent[-1] == [b"u1", OP] and src.closed and len(m) == 0
    m.control(b"id", b"u1", [b"ack"])  # unknown now: ignored
    assert m.stats()["ended"]["cancelled"] == 1


def test_control_for_unknown_streams_is_ignored():
    m, peer, _, _, _ = opened(b"a")
    m.control(b"other", b"u1", [b"cancel"])
    m.control(b"id", b"u9", [b"cancel"])
    m.control(b"id", b"u1", [b"bogus"])
    assert len(m) == 1 and len(peer.sent) == 1


def test_a_closed_source_ends_its_stream_without_waiting_for_credit():
    m, peer, src, _, _ = opened(b"a", b"b")
    src.closed = True  # replaced or reaped
    m.pump()
    assert peer.sent[-1] == [b"u1", OP] and len(m) == 0
    assert src.delivered == [b"a"]


def test_full_peer_keeps_the_batch_back_until_the_tick():
    m, peer, src, _, _ = opened()
    peer.result = Sent.FULL
    src.queue.append(b"a")
    m.pump()
    assert src.delivered == [] and m.stats()["batches_kept_back"] == 1
    peer.result = Sent.SENT
    m.tick()
    assert src.delivered == [b"a"] and peer.sent == [[b"u1", OP, b"a"]]


def test_gone_peer_drops_the_stream_without_an_end_frame():
    m, peer, src, _, _ = opened()
    peer.result = Sent.GONE
    src.queue.append(b"a")
    m.pump()
    assert len(m) == 0 and src.closed and m.stats()["ended"]["peer_gone"] == 1


def test_a_silent_connection_loses_its_streams():
    m, peer, src, clock, _ = opened(b"a", idle=60)
    clock.now += 50
    m.heard(b"id")  # a ping
    clock.now += 50
    m.tick()
    assert len(m) == 1
    clock.now += 61
    m.tick()
    assert len(m) == 0 and peer.sent[-1] == [b"u1", OP] and src.closed
    assert m.stats()["ended"]["silent"] == 1


def test_close_all_ends_every_stream():
    m, peer, src, _, _ = opened(b"a")
    other_peer, other = FakePeer(), FakeSource(b"z")
    m.open(b"id2", b"u1", OP, other, other_peer)
    m.close_all()
    assert peer.sent[-1] == [b"u1", OP] and other_peer.sent[-1] == [b"u1", OP]
    assert src.closed and other.closed and len(m) == 0


def test_a_reused_uid_replaces_the_old_stream():
    m, _, src, _, _ = opened(b"a")
    peer2, src2 = FakePeer(), FakeSource(b"b")
    m.open(b"id", b"u1", OP, src2, peer2)
    assert src.closed and not src2.closed and len(m) == 1
    assert peer2.sent == [[b"u1", OP, b"b"]]


def test_a_failing_source_ends_only_its_stream():
    m, _, src, _, _ = opened(b"a")
    good_peer, good = FakePeer(), FakeSource(b"x", b"y")
    m.open(b"id2", b"u2", OP, good, good_peer)
    src.boom = True
    m.control(b"id", b"u1", [b"ack"])
    m.control(b"id2", b"u2", [b"ack"])
    assert len(m) == 1 and src.closed and m.stats()["ended"]["failed"] == 1
    assert good.delivered == [b"x", b"y"]


def test_a_connection_holds_a_bounded_number_of_streams():
    m = StreamManager()
    for i in range(MAX_STREAMS_PER_CONNECTION):
        assert not m.full(b"id")
        m.open(b"id", str(i).encode(), OP, FakeSource(b"a"), FakePeer())
    assert m.full(b"id") and not m.full(b"other")
    m.control(b"id", b"0", [b"cancel"])
    assert not m.full(b"id")
