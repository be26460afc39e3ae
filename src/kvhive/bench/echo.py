"""The round-trip floor: a bare pyzmq ROUTER that answers every request with ``"OK"`` and
does nothing else.  ``kvhive bench`` times it next to the servers' ``noop`` so an empty
round trip can be read against what ZeroMQ and Python cost on this machine.

Run as ``python -m kvhive.bench.echo PORT``; stops on SIGTERM.
"""

from __future__ import annotations

import sys

import msgspec
import zmq

from kvhive.wire.frames import recv_frames, send_frames

OK = msgspec.msgpack.encode("OK")


def serve(port: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        frames = recv_frames(sock)
        if len(frames) >= 3:  # identity, uid, op: echo them with the result
            send_frames(sock, [frames[0], frames[1], frames[2], OK])


if __name__ == "__main__":
    serve(int(sys.argv[1]))
