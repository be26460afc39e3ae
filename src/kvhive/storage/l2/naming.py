"""L2 object names, byte-compatible with LMCache 0.5.6 so caches can be shared or taken over.

``hash`` is ``chunk_hash`` in lowercase hex, ``group`` is ``object_group_id`` in plain
lowercase hex, and the salt part appears only for a non-empty salt::

    fs, fs_native   <model, "/" -> "-SEP-">@0x<kv_rank:08x>@<group>@<hash>[@<salt>].data
    s3, resp, C     <model>@<kv_rank:08x>@<group>@<hash>[@<salt>]
    raw_block, dax  <model percent-encoded, no safe chars>@0x<kv_rank:08x>@<group>@<hash>[@<salt>]

Example (model ``org/m``, world 1 rank 0, group 0, hash 0101..., salt ``s``): the fs file is
``org-SEP-m@0x01000100@0@0101010101010101@s.data`` and the s3/resp key
``org/m@01000100@0@0101010101010101@s``.  ``@`` cannot occur in a model name or a salt
(``kvhive.keys``), so the names parse back unambiguously.
"""

from __future__ import annotations

import hashlib
import urllib.parse

from kvhive.keys import ObjectKey

SEP = "@"
FS_SLASH = "-SEP-"
FS_SUFFIX = ".data"


def _tail(key: ObjectKey) -> str:
    base = f"{key.object_group_id:x}{SEP}{key.chunk_hash.hex()}"
    return f"{base}{SEP}{key.cache_salt}" if key.cache_salt else base


def fs_name(key: ObjectKey) -> str:
    """File name of ``key`` for the fs and fs_native adapters."""
    model = key.model_name.replace("/", FS_SLASH)
    return f"{model}{SEP}{key.kv_rank:#010x}{SEP}{_tail(key)}{FS_SUFFIX}"


def flat_name(key: ObjectKey) -> str:
    """Object/key name of ``key`` for s3, resp and native plugins."""
    return f"{key.model_name}{SEP}{key.kv_rank:08x}{SEP}{_tail(key)}"


def block_name(key: ObjectKey) -> str:
    """Index string of ``key`` for raw_block (and dax)."""
    model = urllib.parse.quote(key.model_name, safe="")
    return f"{model}{SEP}{key.kv_rank:#010x}{SEP}{_tail(key)}"


def slot_identity(name: str) -> int:
    """raw_block slot identity: BLAKE2b-64 of the index string, read little-endian."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _parse(parts: list[str], model: str) -> ObjectKey | None:
    if len(parts) == 4:
        parts = [*parts, ""]
    if len(parts) != 5:
        return None
    _, rank, group, digest, salt = parts
    try:
        return ObjectKey(bytes.fromhex(digest), model, int(rank, 16), int(group, 16), salt)
    except ValueError:
        return None


def parse_fs_name(name: str) -> ObjectKey | None:
    """Inverse of :func:`fs_name`; None for any other file name (temp files included)."""
    if not name.endswith(FS_SUFFIX):
        return None
    parts = name[: -len(FS_SUFFIX)].split(SEP)
    return _parse(parts, parts[0].replace(FS_SLASH, "/"))


def parse_flat_name(name: str) -> ObjectKey | None:
    """Inverse of :func:`flat_name`."""
    parts = name.split(SEP)
    return _parse(parts, parts[0])


def parse_block_name(name: str) -> ObjectKey | None:
    """Inverse of :func:`block_name`."""
    parts = name.split(SEP)
    return _parse(parts, urllib.parse.unquote(parts[0]))
