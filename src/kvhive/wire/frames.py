"""Multipart send and receive on a ZMQ socket, for the request loop and the client."""

from __future__ import annotations

import zmq

# pyzmq's send_multipart/recv_multipart build IntFlag/SocketOption enums for every frame,
# which costs more than the copy of the small frames most messages carry: send with a plain
# int flag, and read "more" from the received frame instead of a socket option.
_SNDMORE = int(zmq.SNDMORE)


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """All frames of the next message (blocking), as bytes."""
    frame = sock.recv(copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(copy=False)
        frames.append(frame.bytes)
    return frames


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Send ``frames`` as one message (frames at or above the socket's copy threshold
    are sent without a copy)."""
    send = sock.send
    for f in frames[:-1]:
        send(f, _SNDMORE, copy=False)
    send(frames[-1], 0, copy=False)
