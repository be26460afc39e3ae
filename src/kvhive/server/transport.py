"""ZMQ ROUTER loop.  One thread owns the ROUTER socket(s); pool threads hand their
replies back through per-thread inproc PUSH sockets that the loop polls, so no
socket is ever shared between threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import zmq

from kvhive.wire import codec
from kvhive.wire.frames import recv_frames, send_frames

log = logging.getLogger(__name__)

_REPLIES = "inproc://kvhive-replies"

Handle = Callable[[bytes, bytes, bytes, list[bytes], Callable[[list[bytes]], None]], None]


class ZmqServer:
    """Binds ``urls`` (tcp://, ipc://) and feeds every well-formed frame to ``handle``."""

    def __init__(self, urls: list[str], handle: Handle) -> None:
        self._ctx = zmq.Context()
        self._handle = handle
        self._routers: list[zmq.Socket] = []
        for url in urls:
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(url)
            self._routers.append(sock)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(_REPLIES)
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvhive-zmq-loop", daemon=True)
        self.dropped_replies = 0
        self.malformed_frames = 0

    @property
    def endpoints(self) -> list[str]:
        return [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self._routers]

    def start(self) -> None:
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
        while not self._stop.is_set():
            for sock, _ in poller.poll(200):
                if sock is self._pull:
                    self._forward(recv_frames(self._pull))
                else:
                    self._receive(sock)

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
        if op == b"":
            return  # stream-control traffic (ack/cancel); no streams are served

        def reply(parts: list[bytes]) -> None:
            msg = [router_index.to_bytes(1, "big"), identity, *parts]
            if threading.get_ident() == self._thread.ident:
                self._forward(msg)
            else:
                send_frames(self._push(), msg)

        try:
            self._handle(identity, uid, op, frames[3:], reply)
        except Exception:  # the loop must survive anything a handler does
            log.exception("dispatch failed")

    def _forward(self, msg: list[bytes]) -> None:
        router = self._routers[msg[0][0]]
        try:
            send_frames(router, msg[1:])
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY): drop, count
            self.dropped_replies += 1
            log.debug("reply dropped: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)
