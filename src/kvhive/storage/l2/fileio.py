"""Positional file I/O over lists of buffers, with optional O_DIRECT for aligned spans.

``write_at``/``read_at`` move a list of buffers to/from one file offset.  With a direct
descriptor, every span whose memory address, file offset and length are multiples of
``align`` goes through O_DIRECT (bypassing the page cache); the unaligned remainder of
each buffer (e.g. a logical size that is not a multiple of 4 KiB, or the integrity
trailer) goes through the buffered descriptor.  All calls release the GIL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True, slots=True)
class Fds:
    """A file opened buffered, and optionally again with O_DIRECT (``direct`` = -1: none)."""

    buffered: int
    direct: int = -1
    align: int = 4096


def address(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if buf.nbytes else 0


def _direct_span(fds: Fds, buf: memoryview, offset: int) -> int:
    """How many leading bytes of ``buf`` at ``offset`` may go through O_DIRECT."""
    if fds.direct < 0 or offset % fds.align or address(buf) % fds.align:
        return 0
    return buf.nbytes - buf.nbytes % fds.align


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf.nbytes:
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _pread_some(fd: int, buf: memoryview, offset: int) -> int:
    """Read up to ``buf.nbytes`` bytes; fewer only at end of file."""
    got = 0
    while got < buf.nbytes:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def write_at(fds: Fds, offset: int, parts: Sequence[memoryview]) -> int:
    """Write ``parts`` back to back from ``offset``; returns the bytes written."""
    start = offset
    for part in parts:
        part = part.cast("B") if part.format != "B" else part
        span = _direct_span(fds, part, offset)
        if span:
            _pwrite_all(fds.direct, part[:span], offset)
        _pwrite_all(fds.buffered, part[span:], offset + span)
        offset += part.nbytes
    return offset - start


def read_at(fds: Fds, offset: int, parts: Sequence[memoryview], limit: int) -> int:
    """Fill ``parts`` from ``offset`` up to byte ``limit`` of the file; returns bytes read."""
    got = 0
    for part in parts:
        want = min(part.nbytes, max(0, limit - offset))
        if want <= 0:
            break
        span = _direct_span(fds, part[:want], offset)
        n = _pread_some(fds.direct, part[:span], offset) if span else 0
        if n == span:
            n += _pread_some(fds.buffered, part[n:want], offset + n)
        got += n
        offset += n
        if n < want:
            break
    return got


STREAM_PIECE = 4 << 20
"""Bytes read per step by stores that report their progress (``ObjectStore.get_streamed``)."""


def slice_views(parts: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """Views of bytes ``[start, end)`` of the concatenation of ``parts``."""
    out: list[memoryview] = []
    at = 0
    for part in parts:
        lo, hi = max(start, at), min(end, at + part.nbytes)
        if lo < hi:
            out.append(part[lo - at : hi - at])
        at += part.nbytes
    return out


def open_fds(path: str, flags: int, *, direct: bool, align: int = 4096, mode: int = 0o644) -> Fds:
    """Open ``path`` buffered and, if ``direct`` and supported, once more with O_DIRECT."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    dfd = -1
    if direct and O_DIRECT:
        try:
            dfd = os.open(
                path, (flags & ~(os.O_CREAT | os.O_TRUNC | os.O_EXCL)) | O_DIRECT | os.O_CLOEXEC
            )
        except OSError:  # file system without O_DIRECT (tmpfs): buffered only
            dfd = -1
    return Fds(fd, dfd, align)


def close_fds(fds: Fds) -> None:
    for fd in (fds.direct, fds.buffered):
        if fd >= 0:
            os.close(fd)
