"""A peer that does not read its replies must not wedge the server (issue 10, fault 2).

A raw DEALER with a tiny receive high-water mark floods a real server with noops and pings
carrying 64 KiB uid frames and never reads; a SIGSTOPped client process with thousands of
requests in flight is the everyday version.  Meanwhile a second, well-behaved client keeps
pinging: every ping must be answered within a bound, ``health()`` must stay truthful (a
live loop is healthy; a stuck loop is not), and the server must keep serving once the
flooder is gone.  Before the fix the loop thread blocked in a send to the flooder at its
high-water mark and every client timed out: these tests then fail on a ping timeout, never
hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import pytest
import zmq

from kvhive.client import KvhiveClient
from support.servers import running_server

enc = msgspec.msgpack.encode
UID = b"\xc6\x00\x01\x00\x00" + b"u" * 65536  # a msgpack bin of 64 KiB as the uid frame
NOOP, PING = enc(24), enc(22)
PING_BOUND_S = 2.0  # any single ping of the well-behaved client
P99_BOUND_S = 0.5


class Pinger(threading.Thread):
    """A well-behaved client: one ping at a time, recording each round trip."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.failure: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with KvhiveClient(self.url, timeout=PING_BOUND_S) as c:
                while not self.stop.is_set():
                    t0 = time.perf_counter()
                    assert c.call("ping", None) is True
                    self.latencies.append(time.perf_counter() - t0)
                    time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - recorded for the test thread to raise
            self.failure = exc

    def finish(self) -> list[float]:
        self.stop.set()
        self.join(PING_BOUND_S + 5)
        if self.failure is not None:
            raise AssertionError(f"well-behaved client failed: {self.failure!r}")
        return sorted(self.latencies)


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def flooder(url: str) -> zmq.Socket:
    """A DEALER that holds almost nothing it receives: its replies back up at the server."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(url)
    return s


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.timeout(120)
def test_flooder_that_never_reads_does_not_wedge_the_server():
    with running_server() as server:
        url = server.zmq.endpoints[0]
        pinger = Pinger(url)
        pinger.start()
        flood = flooder(url)
        for i in range(3000):
            flood.send_multipart([UID, NOOP if i % 2 else PING, *([] if i % 2 else [enc(1)])])
        # The server takes the flood in; its replies to the flooder overflow and are dropped
        # (before the fix the loop blocked on the flooder instead, and the pinger timed out).
        wait_until(lambda: server.zmq.dropped_replies > 0, 20)
        time.sleep(0.5)  # the well-behaved client keeps being served meanwhile
        lat = pinger.finish()
        assert lat and lat[-1] < PING_BOUND_S and p99(lat) < P99_BOUND_S, (lat[-1], p99(lat))
        assert server.health() == (True, [])  # truthful: the loop is turning
        flood.close(0)
        status = server.status()["transport"]
        assert status["dropped_replies"] >= status["dropped_replies_peer_full"] > 0
        assert max(status["dropped_replies_by_peer"].values()) > 0
        with KvhiveClient(url, timeout=PING_BOUND_S) as c:  # still serving after it left
            assert c.call("noop") == "OK"
            assert c.call("get_chunk_size") == server.config.mp.chunk_size


STOPPED_CLIENT = textwrap.dedent(
    """
    import sys, zmq
    s = zmq.Context().socket(zmq.DEALER)
    s.setsockopt(zmq.RCVHWM, 1)  # a slow reader: little room for replies on its side
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(sys.argv[1])
    uid = b"\\xc6\\x00\\x01\\x00\\x00" + b"u" * 65536
    inflight, window = 0, 4000
    print("ready", flush=True)
    while True:  # pipelines up to `window` requests and reads every reply it gets
        events = s.poll(100, zmq.POLLIN | (zmq.POLLOUT if inflight < window else 0))
        if events & zmq.POLLIN:
            s.recv_multipart()
            inflight -= 1
        if events & zmq.POLLOUT and inflight < window:
            s.send_multipart([uid, b"\\x18"], zmq.NOBLOCK)
            inflight += 1
    """
)


@pytest.mark.timeout(120)
def test_sigstopped_client_process_does_not_wedge_the_server():
    with running_server() as server:
        url = server.zmq.endpoints[0]
        child = subprocess.Popen(
            [sys.executable, "-c", STOPPED_CLIENT, url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            time.sleep(1.0)  # its pipeline is full and flowing
            pinger = Pinger(url)
            pinger.start()
            os.kill(child.pid, signal.SIGSTOP)
            wait_until(lambda: server.zmq.dropped_replies > 0, 20)
            time.sleep(1.0)  # stopped, with its replies piling up at the server
            lat = pinger.finish()
            assert lat and lat[-1] < PING_BOUND_S and p99(lat) < P99_BOUND_S, (
                lat[-1],
                p99(lat),
            )
            assert server.health() == (True, [])
            assert server.status()["transport"]["dropped_replies_peer_full"] > 0
        finally:
            child.kill()  # a stopped process still dies of SIGKILL
            child.wait(10)
        with KvhiveClient(url, timeout=PING_BOUND_S) as c:
            assert c.call("ping", None) is True


def test_health_reports_a_stuck_loop(monkeypatch):
    """``/healthcheck`` tells the truth about the loop: a loop that stops turning makes the
    server unhealthy within ``stall_after_s``, and healthy again once it turns."""
    with running_server() as server:
        assert server.health() == (True, [])
        time.sleep(0.5)  # idle: the loop still beats (it polls with a timeout)
        assert server.health() == (True, [])
        assert server.zmq.stalled_for() < 0.5
        server.zmq.stall_after_s = 0.5
        gate = threading.Event()
        real = server.zmq._handle

        def stuck(*a):
            gate.wait(10)
            real(*a)

        monkeypatch.setattr(server.zmq, "_handle", stuck)
        with KvhiveClient(server.zmq.endpoints[0], timeout=15) as c:
            c.send("noop")
            assert wait_until(lambda: not server.health()[0], 5)
            _, reasons = server.health()
            assert "ZMQ loop has not turned" in reasons[0]
            assert server.status()["is_healthy"] is False
            gate.set()
            assert c.recv()[1] == "OK"
            assert wait_until(lambda: server.health()[0], 5)
