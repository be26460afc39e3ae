"""A small blocking client for tests, benchmarks and operators.

One DEALER socket, one outstanding request at a time per call (pipelining via
``send``/``recv`` when a caller wants it).  Not thread-safe: one client per thread.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import zmq

from kvhive.wire.frames import recv_frames, send_frames
from kvhive.wire.ops import LEGACY_IDS

_OP_IDS = {name: i for i, name in LEGACY_IDS.items()}


class RemoteError(RuntimeError):
    """The server answered with an error reply."""

    def __init__(self, op: str, detail: Any) -> None:
        super().__init__(f"{op}: {detail}")
        self.detail = detail


class KvhiveClient:
    def __init__(self, url: str, *, timeout: float = 10.0, use_names: bool = False) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A receive timeout instead of a poll before each receive: one call less per reply.
        self._sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        self._sock.connect(url)
        self._timeout_ms = int(timeout * 1000)
        self._uids = itertools.count()
        self._use_names = use_names
        self._enc = msgspec.msgpack.Encoder()
        self._op_frames: dict[str, bytes] = {}

    def send(self, op: str, *args: Any) -> int:
        uid = next(self._uids)
        op_frame = self._op_frames.get(op)
        if op_frame is None:
            wire_op: int | str = op if self._use_names else _OP_IDS.get(op, op)
            op_frame = self._op_frames[op] = self._enc.encode(wire_op)
        frames = [self._enc.encode(uid), op_frame]
        frames += [a if isinstance(a, RawFrame) else self._enc.encode(a) for a in args]
        send_frames(self._sock, frames)
        return uid

    def recv(self, type_: Any = Any) -> tuple[int, Any]:
        try:
            frames = recv_frames(self._sock)
        except zmq.Again:
            raise TimeoutError("no reply from kvhive server") from None
        uid = msgspec.msgpack.decode(frames[0])
        op = msgspec.msgpack.decode(frames[1])
        if isinstance(op, str) and op.startswith("error"):
            detail = msgspec.msgpack.decode(frames[2]) if len(frames) > 2 else op
            raise RemoteError(op, detail)
        if len(frames) < 3:
            return uid, None
        return uid, msgspec.msgpack.decode(frames[2], type=type_)

    def call(self, op: str, *args: Any, type_: Any = Any) -> Any:
        uid = self.send(op, *args)
        got, value = self.recv(type_)
        if got != uid:
            raise RuntimeError(f"reply uid {got} does not match request {uid}")
        return value

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> KvhiveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawFrame(bytes):
    """A pre-encoded argument frame sent as is (for malformed-input tests)."""
