"""ZMQ ROUTER loop.  One thread owns the ROUTER socket(s); pool threads hand their
replies back through per-thread inproc PUSH sockets that the loop polls, so no
socket is ever shared between threads.

The loop never blocks on a peer.  Replies go out with ``NOBLOCK``: a peer at its
high-water mark (a client that does not read its replies, or a stopped engine) has the
reply dropped and counted — in total and per peer — instead of stalling every other
client behind it; a peer that is gone (``ROUTER_MANDATORY``: unroutable) likewise.  The
loop polls with a timeout and records a heartbeat on every turn, so an idle loop still
beats and a stuck one shows in ``/healthcheck`` (:meth:`ZmqServer.stalled_for`).

Server-push streams (``subscribe_kv_events``) live in the loop's
:class:`~kvhive.server.streams.StreamManager`: the loop routes stream-control frames (an
empty op frame: ``ack``/``cancel``) to it, pumps it when a source wakes the loop
(:meth:`ZmqServer.wake`, any thread: a one-frame message on the reply socket, coalesced),
ticks it about once a second (silent connections, batches kept back) and ends every stream
when it stops.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import zmq

from kvhive.server.streams import Sent, StreamManager
from kvhive.wire import codec
from kvhive.wire.frames import recv_frames, send_frames

log = logging.getLogger(__name__)

_REPLIES = "inproc://kvhive-replies"

Handle = Callable[[bytes, bytes, bytes, list[bytes], Callable[[list[bytes]], None]], None]

# The loop wakes at least this often (ms) when idle, so its heartbeat keeps moving.
POLL_TIMEOUT_MS = 200
# The loop counts as stuck (unhealthy) when it has not turned for this long (seconds).
# A turn handles one message per socket: an inline op is O(1) on a few bytes.
LOOP_STALL_S = 5.0
# Peers whose dropped replies are kept by identity (the most recent droppers).
_DROP_PEERS = 64
# Streams get a tick (silent connections, kept-back batches) this often (seconds).
STREAM_TICK_S = 1.0
# At shutdown the loop sends every stream's end frame; closing waits this long (ms) at most
# for them to leave (only when there were streams to end).
STREAM_END_LINGER_MS = 200

_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class _Peer:
    """The reply target of one request: ``__call__`` from any thread (the loop sends at
    once, a pool thread hands the reply to the loop), ``send_now`` on the loop only."""

    __slots__ = ("_server", "_router", "_identity")

    def __init__(self, server: ZmqServer, router: int, identity: bytes) -> None:
        self._server = server
        self._router = router.to_bytes(1, "big")
        self._identity = identity

    def __call__(self, parts: list[bytes]) -> None:
        server = self._server
        msg = [self._router, self._identity, *parts]
        if threading.get_ident() == server._thread.ident:
            server._forward(msg)
        else:
            send_frames(server._push(), msg)

    def send_now(self, parts: list[bytes]) -> Sent:
        return self._server._forward([self._router, self._identity, *parts])


class ZmqServer:
    """Binds ``urls`` (tcp://, ipc://) and feeds every well-formed frame to ``handle``;
    stream-control frames go to ``streams`` (the dispatcher's stream manager)."""

    def __init__(
        self, urls: list[str], handle: Handle, *, streams: StreamManager | None = None
    ) -> None:
        self._ctx = zmq.Context()
        self._handle = handle
        self.streams = streams if streams is not None else StreamManager()
        self.streams.attach(self.wake)
        self._woken = False  # a wake-up is pending: pump the streams after this turn
        self._end_linger = False  # the loop ended streams at exit: let their end frames leave
        self._routers: list[zmq.Socket] = []
        for url in urls:
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(url)
            self._routers.append(sock)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(_REPLIES)
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvhive-zmq-loop", daemon=True)
        self.stall_after_s = LOOP_STALL_S
        self.last_beat = 0.0  # time.monotonic() of the loop's latest turn
        self.dropped_replies = 0  # replies not sent: peer at its high-water mark or gone
        self.dropped_full = 0  # ... of which the peer was at its high-water mark
        self._drops_by_peer: OrderedDict[bytes, int] = OrderedDict()
        self._drops_lock = threading.Lock()  # the loop writes, /status reads
        self.malformed_frames = 0

    @property
    def endpoints(self) -> list[str]:
        return [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self._routers]

    def start(self) -> None:
        self.last_beat = time.monotonic()
        self._thread.start()

    def _push(self) -> zmq.Socket:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(_REPLIES)
            self._local.push = sock
            with self._push_lock:
                self._push_sockets.append(sock)
        return sock

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in self._routers:
            poller.register(sock, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        next_tick = 0.0
        while not self._stop.is_set():
            self.last_beat = now = time.monotonic()
            try:
                for sock, _ in poller.poll(POLL_TIMEOUT_MS):
                    if sock is self._pull:
                        msg = recv_frames(self._pull)
                        if len(msg) > 1:  # a reply; one frame is a wake-up (see wake())
                            self._forward(msg)
                    else:
                        self._receive(sock)
                if self._woken:
                    self._woken = False
                    self.streams.pump()
                if len(self.streams) and now >= next_tick:
                    next_tick = now + STREAM_TICK_S
                    self.streams.tick()
            except Exception:  # the loop serves everyone: log and go on
                if self._stop.is_set():
                    break
                log.exception("ZMQ loop turn failed")
        self._end_streams()

    def _end_streams(self) -> None:
        """Loop exit: every open stream gets its end frame (loop thread, the socket owner)."""
        if not len(self.streams):
            return
        try:
            self.streams.close_all()
            for sock in self._routers:
                sock.setsockopt(zmq.LINGER, STREAM_END_LINGER_MS)
            self._end_linger = True
        except Exception:  # shutdown goes on without the end frames
            log.exception("ending streams at shutdown failed")

    def wake(self) -> None:
        """Ask the loop to pump the streams (any thread; coalesced: one wake-up pending at
        most).  On the loop thread it only marks the wake-up: the turn ends with the pump."""
        if self._woken:
            return
        self._woken = True
        if threading.get_ident() == self._thread.ident or self._stop.is_set():
            return
        # Full: the loop is busy and pumps after its turn anyway.  Closing: nothing to pump.
        with contextlib.suppress(zmq.ZMQError):
            self._push().send(b"", _NOBLOCK)

    def _receive(self, router: zmq.Socket) -> None:
        frames = recv_frames(router)
        router_index = self._routers.index(router)
        if len(frames) < 3:
            self.malformed_frames += 1
            log.warning("malformed message with %d frame(s)", len(frames))
            if len(frames) == 2:  # a uid without an op: answer so the caller fails fast
                err = codec.error_frames("protocol", "message has no operation frame")
                self._forward([router_index.to_bytes(1, "big"), frames[0], frames[1], *err])
            return
        identity, uid, op = frames[0], frames[1], frames[2]
        streams = self.streams
        if len(streams):
            streams.heard(identity)
        if op == b"":  # stream control: [uid | b"" | b"ack" or b"cancel"]
            streams.control(identity, uid, frames[3:])
            return
        try:
            self._handle(identity, uid, op, frames[3:], _Peer(self, router_index, identity))
        except Exception:  # the loop must survive anything a handler does
            log.exception("dispatch failed")

    def _forward(self, msg: list[bytes]) -> Sent:
        """Send ``[router index, identity, *parts]`` without ever blocking the loop."""
        router = self._routers[msg[0][0]]
        identity = msg[1]
        try:
            # ROUTER checks the peer's pipe on the identity frame: EAGAIN there when the
            # peer is at its high-water mark, EHOSTUNREACH when it is gone.  Once the
            # identity frame is taken, the rest of the message always is.
            router.send(identity, _NOBLOCK_MORE, copy=False)
        except zmq.Again:
            self._dropped(identity, full=True)
            return Sent.FULL
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY): drop, count
            self._dropped(identity, full=False)
            log.debug("reply dropped: %s", exc)
            return Sent.GONE
        parts = msg[2:]
        for f in parts[:-1]:
            router.send(f, _NOBLOCK_MORE, copy=False)
        router.send(parts[-1], _NOBLOCK, copy=False)
        return Sent.SENT

    def _dropped(self, identity: bytes, *, full: bool) -> None:
        """Count a reply not sent to ``identity`` (loop thread only)."""
        self.dropped_replies += 1
        self.dropped_full += full
        with self._drops_lock:
            n = self._drops_by_peer.pop(identity, 0) + 1
            self._drops_by_peer[identity] = n  # most recent last
            if len(self._drops_by_peer) > _DROP_PEERS:
                self._drops_by_peer.popitem(last=False)
        if full and (n & (n - 1)) == 0:  # 1, 2, 4, 8, ...: a trace, not a flood
            log.warning(
                "peer %s does not read its replies (at its high-water mark): %d dropped",
                identity.hex(),
                n,
            )

    def dropped_by_peer(self, top: int = 8) -> dict[str, int]:
        """Dropped replies of the peers that lost the most (identity as hex)."""
        with self._drops_lock:
            snapshot = list(self._drops_by_peer.items())
        snapshot.sort(key=lambda kv: kv[1], reverse=True)
        return {ident.hex()[:32]: n for ident, n in snapshot[:top]}

    def stalled_for(self) -> float:
        """Seconds since the loop's last turn, 0.0 when it is not running (not started,
        or closed): an idle loop turns every ``POLL_TIMEOUT_MS``."""
        if not self._thread.is_alive() or self._stop.is_set():
            return 0.0
        return max(0.0, time.monotonic() - self.last_beat)

    def loop_problem(self) -> str | None:
        """Why the loop cannot serve, or None: it stopped turning for ``stall_after_s``,
        or its thread ended while the server runs."""
        if self._thread.ident is not None and not self._stop.is_set():
            if not self._thread.is_alive():
                return "ZMQ loop thread is not running"
            stalled = self.stalled_for()
            if stalled > self.stall_after_s:
                return (
                    f"ZMQ loop has not turned for {stalled:.1f} s "
                    f"(limit {self.stall_after_s:g} s): no request is being answered"
                )
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        # The routers linger briefly only when the loop just sent streams' end frames.
        self._ctx.destroy(linger=None if self._end_linger else 0)
