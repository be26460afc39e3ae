"""Server-push streams (protocol.md §2.4): the loop's table of open streams and their credits.

::

    client (DEALER)                     server (ROUTER loop thread)
    [uid | op | args...]        ──►     open: the handler returns a StreamSource
                                ◄──     [uid | op | batch]     the first batch, at once
    [uid | b"" | b"ack"]        ──►     one credit
                                ◄──     [uid | op | batch]     when the source has one
    [uid | b"" | b"cancel"]     ──►
                                ◄──     [uid | op]             the end (no payload frame)

A stream holds at most one unacknowledged batch: the next is sent only after the client's
ack, so a client that stops reading costs one batch, never a queue.  Batches go out with the
loop's non-blocking send: a peer at its high-water mark has the batch kept back (the source
reads it again, with whatever arrived since, on the next tick), a peer that is gone has its
stream closed.  A stream ends (end frame, then the source is closed) when the client
cancels, when its source closes (replaced by a newer subscription, instance reaped, the
channel off), when its connection has sent nothing for ``idle_close_s`` (workers ping every
10 s; a connection silent that long is dead or forgotten), and at shutdown.  Control frames
for an unknown ``(identity, uid)`` are ignored.

Only the loop thread calls a :class:`StreamManager`; sources call the ``wake`` hook it gives
them (any thread) when they may have something new, and the loop then pumps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

ACK = b"ack"
CANCEL = b"cancel"
# A stream whose connection sent no frame for this long is closed (the reference closes a
# subscription whose worker stopped pinging for its reap timeout).
DEFAULT_IDLE_CLOSE_S = 600.0
# Streams one connection may hold open (a vLLM worker holds one); past it a new subscription
# is refused with an error reply, so a client cannot grow the table without bound.
MAX_STREAMS_PER_CONNECTION = 64
# Why streams end (the keys of ``StreamManager.ended``).
END_REASONS = ("cancelled", "closed", "silent", "peer_gone", "shutdown", "replaced", "failed")


class Sent(Enum):
    """Outcome of one non-blocking send on the loop."""

    SENT = "sent"
    FULL = "full"  # the peer is at its high-water mark: nothing was sent
    GONE = "gone"  # the peer is not connected (unroutable)


@runtime_checkable
class Peer(Protocol):
    """Where a request's answer goes: ``__call__`` replies (any thread); ``send_now`` sends
    on the loop thread and says whether it went."""

    def __call__(self, parts: list[bytes]) -> None: ...

    def send_now(self, parts: list[bytes]) -> Sent: ...


@runtime_checkable
class StreamSource(Protocol):
    """What a streaming op's handler returns.  ``poll``/``sent``/``close`` run on the loop.

    ``poll()``: the next payload to send now, or None; it counts as delivered only after
    ``sent()``, so an unsent payload is read again later.  ``closed``: the stream must end.
    ``close()``: the stream is gone (idempotent).  ``attach(wake)``: call ``wake()`` from
    any thread when a poll may have something new (or the source closed)."""

    @property
    def closed(self) -> bool: ...

    def attach(self, wake: Callable[[], None]) -> None: ...

    def poll(self) -> bytes | None: ...

    def sent(self) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Stream:
    identity: bytes
    uid: bytes
    op: bytes
    source: StreamSource
    peer: Peer
    credit: bool = True  # the client acknowledged everything sent so far


def _nothing() -> None:
    return None


class StreamManager:
    """Open streams by ``(identity, uid)``; see the module docstring.  Loop thread only
    (``stats()`` excepted: plain counters read from anywhere)."""

    def __init__(
        self,
        *,
        idle_close_s: float = DEFAULT_IDLE_CLOSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_close_s = idle_close_s
        self._clock = clock
        self._streams: dict[tuple[bytes, bytes], _Stream] = {}
        self._heard: dict[bytes, float] = {}  # last frame from each identity with a stream
        self._wake: Callable[[], None] = _nothing
        self._retry = False  # a batch was kept back (peer full): pump again on the tick
        self.opened = self.batches = self.acks = 0
        self.ended = dict.fromkeys(END_REASONS, 0)  # fixed keys: stats() reads it anywhere
        self.kept_back = 0  # batches not sent because the peer was full (sent later)

    def __len__(self) -> int:
        return len(self._streams)

    def full(self, identity: bytes) -> bool:
        """Whether ``identity`` holds ``MAX_STREAMS_PER_CONNECTION`` streams already."""
        if identity not in self._heard:
            return False
        n = sum(1 for ident, _ in self._streams if ident == identity)
        return n >= MAX_STREAMS_PER_CONNECTION

    def attach(self, wake: Callable[[], None]) -> None:
        """The transport's wake-up (any thread: asks the loop to :meth:`pump`)."""
        self._wake = wake

    # ---- loop-thread entry points -------------------------------------------------------

    def open(
        self, identity: bytes, uid: bytes, op: bytes, source: StreamSource, peer: Peer
    ) -> None:
        """Start a stream and send its first batch now."""
        old = self._streams.pop((identity, uid), None)
        if old is not None:  # a client reusing a uid: its old stream is over
            self._count_end("replaced")
            old.source.close()
        st = _Stream(identity, uid, op, source, peer)
        self._streams[(identity, uid)] = st
        self._heard[identity] = self._clock()
        self.opened += 1
        source.attach(self._wake)
        self._pump_one(st)

    def control(self, identity: bytes, uid: bytes, payload: list[bytes]) -> None:
        """A stream-control message (``[uid | b"" | action]``)."""
        st = self._streams.get((identity, uid))
        if st is None:
            return
        if payload == [ACK]:
            self.acks += 1
            st.credit = True
            self._pump_one(st)
        elif payload == [CANCEL]:
            self._end(st, "cancelled")

    def heard(self, identity: bytes) -> None:
        """Any frame from ``identity``: its connection is alive."""
        if identity in self._heard:
            self._heard[identity] = self._clock()

    def pump(self) -> None:
        """Send what the sources have (after a wake-up)."""
        for st in list(self._streams.values()):
            self._pump_one(st)

    def tick(self) -> None:
        """Periodic (about once a second): close streams of silent connections, retry
        batches kept back."""
        now = self._clock()
        silent = {i for i, t in self._heard.items() if now - t > self.idle_close_s}
        retry, self._retry = self._retry, False
        for st in list(self._streams.values()):
            if st.identity in silent:
                self._end(st, "silent")
            elif retry:
                self._pump_one(st)

    def close_all(self) -> None:
        """Shutdown: end every stream."""
        for st in list(self._streams.values()):
            self._end(st, "shutdown")

    # ---- internals -------------------------------------------------------------------------

    def _pump_one(self, st: _Stream) -> None:
        try:
            if not st.source.closed and st.credit:
                payload = st.source.poll()
                if payload is not None and not st.source.closed:
                    self._send(st, payload)
                    return
            if st.source.closed:
                self._end(st, "closed")
        except Exception:  # one broken source must not stop the loop's other streams
            log.exception("stream %s of %s failed; ending it", st.uid.hex(), st.identity.hex())
            self._end(st, "failed")

    def _send(self, st: _Stream, payload: bytes) -> None:
        res = st.peer.send_now([st.uid, st.op, payload])
        if res is Sent.SENT:
            st.credit = False
            self.batches += 1
            st.source.sent()
        elif res is Sent.FULL:
            self.kept_back += 1
            self._retry = True
        else:
            self._drop(st, "peer_gone")

    def _end(self, st: _Stream, why: str) -> None:
        """Drop the stream, then send its end frame (best effort: a full or gone peer does
        not get it); by the time the client reads the end, the source is closed."""
        if self._streams.get((st.identity, st.uid)) is not st:
            return
        self._drop(st, why)
        st.peer.send_now([st.uid, st.op])

    def _drop(self, st: _Stream, why: str) -> None:
        del self._streams[(st.identity, st.uid)]
        if not any(s.identity == st.identity for s in self._streams.values()):
            self._heard.pop(st.identity, None)
        self._count_end(why)
        st.source.close()

    def _count_end(self, why: str) -> None:
        self.ended[why] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "open": len(self._streams),
            "opened": self.opened,
            "batches_sent": self.batches,
            "acks": self.acks,
            "batches_kept_back": self.kept_back,
            "ended": dict(self.ended),
        }
