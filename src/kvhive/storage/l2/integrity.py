"""Per-object integrity for durable L2 adapters: a 24-byte trailer bound to the object's key.

Stored object (``integrity: "checksum"``, the default of durable adapters)::

    +------------------------------+--------------------------------------------------+
    | payload: the L1 object's     | trailer, little-endian: magic b"KVHVOBJ1" (8),   |
    | logical bytes, verbatim      | payload length u64, check u32, format version    |
    |                              | u32 (= 2)                                        |
    +------------------------------+--------------------------------------------------+

    check = CRC-32 over (payload, then key_digest(key))
    key_digest(key) = BLAKE2b-64 of the key's canonical name (naming.flat_name, UTF-8)

Binding the key into the check makes a *valid object under the wrong name* a corrupt object:
copying chunk B's object over chunk A's name (a confused shared tier, a restore from backup,
a hostile copy) fails A's check, so a load of A is a counted miss and the object is removed,
never B's bytes served as A's.  The digest is of the key, not of the adapter's object name,
so an object moved between tiers under the same key stays valid.  (A CRC is no MAC: a writer
who means harm can forge a trailer; this protects against mix-ups and decay, not forgery.)

A trailer rather than a header keeps the payload at offset 0, so LMCache's ``fs`` adapter
(which reads exactly the logical size and ignores extra bytes) still reads kvhive's files.

Reading accepts, whatever the write mode:

* a framed object (version 2): exact length and a matching key-bound check;
* an unframed object of exactly the logical size: a reference object, or one written with
  ``integrity: "raw"`` (only its length can be checked);
* an unframed object padded to the next 4 KiB: the reference ``fs_native`` O_DIRECT format.

Anything else raises :class:`CorruptObject`, including version-1 trailers (kvhive before
the key was bound: their check names no key, so a copied one would pass; they read as
corrupt once, are removed and are rewritten by the next store).

``integrity: "raw"`` writes the reference's bare format (no trailer) for tiers shared with
reference servers that check exact lengths (fs_native, resp, s3).  Such objects carry
nothing that names their key, so a raw object copied under another name **cannot be
detected**; neither can a reference-format object in a ``checksum`` tier, which is read for
compatibility.  Only framed objects are protected.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from kvhive.config.l2_adapters import Integrity
from kvhive.errors import CorruptObject
from kvhive.keys import ObjectKey
from kvhive.storage.l2.naming import flat_name

MAGIC = b"KVHVOBJ1"
VERSION = 2
_UNBOUND_VERSION = 1
_TRAILER = struct.Struct("<8sQII")
TRAILER_BYTES = _TRAILER.size
_PAD = 4096


def key_digest(key: ObjectKey) -> bytes:
    """The 8 bytes that bind an object to ``key``: BLAKE2b-64 of its canonical name.

    ``flat_name`` is injective (``@`` cannot occur in a model name or a salt, the other
    fields are hex), so distinct keys have distinct names.
    """
    return hashlib.blake2b(flat_name(key).encode(), digest_size=8).digest()


def checksum(payload: memoryview, bound_to: bytes = b"") -> int:
    """CRC-32 of ``payload`` followed by ``bound_to`` (a :func:`key_digest`); zlib releases
    the GIL for large buffers."""
    return zlib.crc32(bound_to, zlib.crc32(payload)) & 0xFFFFFFFF


def make_trailer(payload: memoryview, bound_to: bytes = b"") -> bytes:
    """The trailer that follows ``payload`` in a framed object stored for the key whose
    :func:`key_digest` is ``bound_to``."""
    return _TRAILER.pack(MAGIC, payload.nbytes, checksum(payload, bound_to), VERSION)


def verify(payload: memoryview, total: int, tail: memoryview, bound_to: bytes = b"") -> None:
    """Check an object that was read as ``payload`` followed by ``tail``.

    ``payload`` holds the first ``payload.nbytes`` (= the expected logical size) bytes of the
    object, ``tail`` the next ``TRAILER_BYTES`` (as far as the object reached), ``total`` is
    the stored length and ``bound_to`` the :func:`key_digest` of the key it was loaded for.
    Raises :class:`CorruptObject` unless the object is valid for that key.
    """
    n = payload.nbytes
    if total == n + TRAILER_BYTES and bytes(tail[:8]) == MAGIC:
        _, length, check, version = _TRAILER.unpack(bytes(tail[:TRAILER_BYTES]))
        if version == _UNBOUND_VERSION:
            raise CorruptObject("version-1 trailer names no key (written before key binding)")
        if length != n or version != VERSION:
            raise CorruptObject(f"trailer says {length} bytes v{version}, expected {n} v{VERSION}")
        if checksum(payload, bound_to) != check:
            raise CorruptObject("checksum mismatch (damaged, or another key's object)")
        return
    if total == n:
        return  # reference format: length is all there is to check
    if n < total < n + _PAD and total % _PAD == 0:
        return  # reference fs_native O_DIRECT: physical size, zero padded
    raise CorruptObject(f"stored length {total} does not match the expected {n} bytes")


def stored_size(nbytes: int, mode: Integrity) -> int:
    """Bytes an object of ``nbytes`` logical bytes occupies in the backend."""
    return nbytes + TRAILER_BYTES if mode == "checksum" else nbytes
