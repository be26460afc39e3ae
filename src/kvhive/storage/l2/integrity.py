"""Per-object integrity for durable L2 adapters: an optional 24-byte trailer.

Stored object (``integrity: "checksum"``, the default of durable adapters)::

    +------------------------------+--------------------------------------------------+
    | payload: the L1 object's     | trailer, little-endian: magic b"KVHVOBJ1" (8),   |
    | logical bytes, verbatim      | payload length u64, CRC-32 of the payload u32,   |
    |                              | format version u32 (= 1)                         |
    +------------------------------+--------------------------------------------------+

A trailer rather than a header keeps the payload at offset 0, so LMCache's ``fs`` adapter
(which reads exactly the logical size and ignores extra bytes) still reads kvhive's files.
``integrity: "raw"`` writes the reference format (payload only) for backends shared with
reference servers that check exact lengths (fs_native, resp, s3).

Reading accepts every format, whatever the write mode: a framed object must have the exact
length and a matching CRC; an unframed object of exactly the logical size is a reference
object (only its length can be checked); an unframed object padded to the next 4 KiB is
the reference ``fs_native`` O_DIRECT format.  Anything else raises :class:`CorruptObject`.
"""

from __future__ import annotations

import struct
import zlib

from kvhive.config.l2_adapters import Integrity
from kvhive.errors import CorruptObject

MAGIC = b"KVHVOBJ1"
VERSION = 1
_TRAILER = struct.Struct("<8sQII")
TRAILER_BYTES = _TRAILER.size
_PAD = 4096


def checksum(payload: memoryview) -> int:
    """CRC-32 of ``payload`` (zlib releases the GIL for large buffers)."""
    return zlib.crc32(payload) & 0xFFFFFFFF


def make_trailer(payload: memoryview) -> bytes:
    """The trailer that follows ``payload`` in a framed object."""
    return _TRAILER.pack(MAGIC, payload.nbytes, checksum(payload), VERSION)


def verify(payload: memoryview, total: int, tail: memoryview) -> None:
    """Check an object that was read as ``payload`` followed by ``tail``.

    ``payload`` holds the first ``payload.nbytes`` (= the expected logical size) bytes of the
    object, ``tail`` the next ``TRAILER_BYTES`` (as far as the object reached) and ``total``
    is the stored length.  Raises :class:`CorruptObject` unless the object is valid.
    """
    n = payload.nbytes
    if total == n + TRAILER_BYTES and bytes(tail[:8]) == MAGIC:
        _, length, crc, version = _TRAILER.unpack(bytes(tail[:TRAILER_BYTES]))
        if length != n or version != VERSION:
            raise CorruptObject(f"trailer says {length} bytes v{version}, expected {n} v1")
        if checksum(payload) != crc:
            raise CorruptObject("checksum mismatch")
        return
    if total == n:
        return  # reference format: length is all there is to check
    if n < total < n + _PAD and total % _PAD == 0:
        return  # reference fs_native O_DIRECT: physical size, zero padded
    raise CorruptObject(f"stored length {total} does not match the expected {n} bytes")


def stored_size(nbytes: int, mode: Integrity) -> int:
    """Bytes an object of ``nbytes`` logical bytes occupies in the backend."""
    return nbytes + TRAILER_BYTES if mode == "checksum" else nbytes
