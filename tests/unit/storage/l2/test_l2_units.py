"""Naming, integrity framing, the tracker and small helpers of the L2 package."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvhive.errors import CorruptObject
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.eviction import make_policy
from kvhive.storage.l2 import integrity, naming
from kvhive.storage.l2.adapters.s3 import _scatter, split_endpoint
from kvhive.storage.l2.tracker import Tracker
from support.integrity import read_stored

KEY = ObjectKey(bytes.fromhex("0101010101010101"), "org/m", pack_kv_rank(1, 0), 0, "s")


def test_names_match_the_reference_examples() -> None:
    assert naming.fs_name(KEY) == "org-SEP-m@0x01000100@0@0101010101010101@s.data"
    assert naming.flat_name(KEY) == "org/m@01000100@0@0101010101010101@s"
    assert naming.block_name(KEY) == "org%2Fm@0x01000100@0@0101010101010101@s"
    unsalted = ObjectKey(KEY.chunk_hash, "m", pack_kv_rank(2, 1), 10)
    assert naming.fs_name(unsalted) == "m@0x02010201@a@0101010101010101.data"
    for key in (KEY, unsalted):
        assert naming.parse_fs_name(naming.fs_name(key)) == key
        assert naming.parse_flat_name(naming.flat_name(key)) == key
        assert naming.parse_block_name(naming.block_name(key)) == key
    assert naming.parse_fs_name("m@0x1@0@zz.data") is None
    assert naming.parse_fs_name("x.data.1234.tmp") is None
    assert naming.slot_identity("a") == naming.slot_identity("a") != naming.slot_identity("b")


def test_integrity_accepts_framed_raw_and_padded_objects() -> None:
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    framed = data + integrity.make_trailer(memoryview(data))
    integrity.verify(*read_stored(framed, 5000))
    integrity.verify(*read_stored(data, 5000))  # reference format
    integrity.verify(*read_stored(data + bytes(8192 - 5000), 5000))  # reference fs_native O_DIRECT


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:],  # flipped payload bit
        lambda b: b[:-1],  # truncated trailer
        lambda b: b[:4000],  # short
        lambda b: b + b"x",  # too long
    ],
)
def test_integrity_rejects_damage(mutate) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 20
    framed = data + integrity.make_trailer(memoryview(data))
    with pytest.raises(CorruptObject):
        integrity.verify(*read_stored(mutate(framed), len(data)))


def test_tracker_capacity_sizes_and_salts() -> None:
    t = Tracker(capacity_bytes=300, policy=make_policy("LRU"))
    ks = [ObjectKey(bytes([i]) * 8, "m", 1, 0, "a" if i < 2 else "b") for i in range(4)]
    assert t.reserve(ks[:3], [100] * 3) == [True, True, True]
    assert t.reserve(ks[3:], [100]) == [False]  # reserved bytes count
    t.settle(ks[:3], [100] * 3, [True, True, False])
    assert t.usage().bytes_by_salt == {"a": 200}
    t.settle([ks[0]], [150], [True])  # a re-store with a new size is recorded
    assert t.usage().used_bytes == 250
    t.pin([ks[1]])
    assert t.pick(1) == [ks[0]]  # the pinned key is never picked
    t.removed(ks)
    assert t.usage().used_bytes == 0 and t.usage().bytes_by_salt == {}


def test_s3_endpoint_forms_and_bounded_scatter() -> None:
    assert split_endpoint("s3://bkt.example.com", "r", "auto") == ("bkt.example.com", "", None)
    assert split_endpoint("bkt", "us-west-2", "auto") == (
        "bkt.s3.us-west-2.amazonaws.com",
        "",
        None,
    )
    assert split_endpoint("http://127.0.0.1:9000/bkt", "r", "auto") == (
        "127.0.0.1:9000",
        "/bkt",
        False,
    )
    assert split_endpoint("s3://bkt.h", "r", "path") == ("h", "/bkt", None)
    a, b = memoryview(bytearray(4)), memoryview(bytearray(2))
    _scatter([a, b], memoryview(b"123456789"), 0)  # longer than the buffers: never overruns
    assert bytes(a) + bytes(b) == b"123456"


def test_format_2_crc_trailers_written_by_earlier_kvhive_still_verify() -> None:
    """Objects framed before the XXH3 trailer (magic KVHVOBJ1, CRC-32, version 2) stay
    readable, still bound to their key; new objects get format 3 (magic KVHVOBJ3)."""
    import struct
    import zlib

    data = os.urandom(5000)
    da, db = b"A" * 8, b"B" * 8
    v2 = struct.pack("<8sQII", b"KVHVOBJ1", len(data), zlib.crc32(da, zlib.crc32(data)), 2)
    integrity.verify(*read_stored(data + v2, 5000), da)
    with pytest.raises(CorruptObject, match="checksum mismatch"):
        integrity.verify(*read_stored(data + v2, 5000), db)
    trailer = integrity.make_trailer(memoryview(data), da)
    assert trailer[:8] == b"KVHVOBJ3" and len(trailer) == integrity.TRAILER_BYTES == 24
    flipped = bytearray(data)
    flipped[4999] ^= 1
    with pytest.raises(CorruptObject, match="checksum mismatch"):
        integrity.verify(*read_stored(bytes(flipped) + trailer, 5000), da)
