"""Reading a stored L2 object the way an adapter's load does, for integrity tests."""

from __future__ import annotations

from kvhive.storage.l2 import integrity


def read_stored(stored: bytes, n: int) -> tuple[memoryview, int, memoryview]:
    """``integrity.verify``'s arguments for loading ``stored`` into an ``n``-byte buffer:
    (payload buffer, stored length, trailer buffer), as a pread of the object fills them."""
    payload = memoryview(bytearray(n))
    tail = memoryview(bytearray(integrity.TRAILER_BYTES))
    payload[: min(n, len(stored))] = stored[:n]
    rest = stored[n : n + integrity.TRAILER_BYTES]
    tail[: len(rest)] = rest
    return payload, len(stored), tail
