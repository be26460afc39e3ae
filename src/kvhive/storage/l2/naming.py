"""L2 object names, byte-compatible with LMCache 0.5.6 so caches can be shared or taken over.

``hash`` is ``chunk_hash`` in lowercase hex, ``group`` is ``object_group_id`` in plain
lowercase hex, and the salt part appears only for a non-empty salt::

    fs, fs_native   <fs_model(model)>@0x<kv_rank:08x>@<group>@<hash>[@<salt>].data
    s3, resp, C     <model>@<kv_rank:08x>@<group>@<hash>[@<salt>]
    raw_block, dax  <model percent-encoded, no safe chars>@0x<kv_rank:08x>@<group>@<hash>[@<salt>]

Example (model ``org/m``, world 1 rank 0, group 0, hash 0101..., salt ``s``): the fs file is
``org-SEP-m@0x01000100@0@0101010101010101@s.data`` and the s3/resp key
``org/m@01000100@0@0101010101010101@s``.  ``@`` cannot occur in a model name or a salt
(``kvhive.keys``), so the names parse back unambiguously.

fs model part (``fs_model``).  The reference writes the model with ``/`` replaced by
``-SEP-``, which is not injective: models ``a/b`` and ``a-SEP-b`` (also ``x-SEP/`` and
``x/SEP-``) get the same files, and one would be served the other's KV.  kvhive keeps the
reference's name for every model it maps unambiguously (no ``%``, and ``-SEP-`` in the name
decodes back to the same model: ``org/m``, ``meta-llama/Llama-3-8B``), so caches shared with
reference servers stay shared; any other model is percent-escaped (``%`` -> ``%25``,
``/`` -> ``%2F``, ``-`` -> ``%2D``: ``a-SEP-b`` -> ``a%2DSEP%2Db``).  An escaped name always
contains ``%`` and a reference name never does, and each form is injective on its own, so no
two models share a file.  (A reference server still writes ``a-SEP-b``'s objects under
``a/b``'s name; that ambiguity is the reference's.)
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


_FS_ESCAPES = {"%": "%25", "/": "%2F", "-": "%2D"}


def fs_model(model: str) -> str:
    """The model part of an fs file name: the reference's where it is unambiguous, else
    percent-escaped (module docstring).  Injective."""
    ref = model.replace("/", FS_SLASH)
    if "%" not in model and ref.replace(FS_SLASH, "/") == model:
        return ref
    return "".join(_FS_ESCAPES.get(c, c) for c in model)


def _fs_model_back(part: str) -> str:
    return urllib.parse.unquote(part) if "%" in part else part.replace(FS_SLASH, "/")


def fs_name(key: ObjectKey) -> str:
    """File name of ``key`` for the fs and fs_native adapters."""
    return f"{fs_model(key.model_name)}{SEP}{key.kv_rank:#010x}{SEP}{_tail(key)}{FS_SUFFIX}"


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
    """Inverse of :func:`fs_name`; None for any name :func:`fs_name` does not produce (temp
    files, foreign escapes), so a parsed key always maps back to the same file."""
    if not name.endswith(FS_SUFFIX):
        return None
    parts = name[: -len(FS_SUFFIX)].split(SEP)
    key = _parse(parts, _fs_model_back(parts[0]))
    return key if key is not None and fs_name(key) == name else None


def parse_flat_name(name: str) -> ObjectKey | None:
    """Inverse of :func:`flat_name`."""
    parts = name.split(SEP)
    return _parse(parts, parts[0])


def parse_block_name(name: str) -> ObjectKey | None:
    """Inverse of :func:`block_name`."""
    parts = name.split(SEP)
    return _parse(parts, urllib.parse.unquote(parts[0]))


# -- nixl_store_dynamic ----------------------------------------------------------------------
#
#   <nixl_model(model)>_<kv_rank:08x>_<group>_<hash>[@<salt>].bin, with shard_dirs inside
#   <hash[0:2]>/<hash[2:4]>/ (LMCache's DynamicNixlStoreL2Adapter).  The reference writes the
#   model with "/" -> "--", which is not injective ("a/b" and "a--b" share files); as for fs,
#   kvhive keeps the reference's name wherever "--" decodes back to the same model and
#   percent-escapes every other model (such names always contain "%", reference names never).

NIXL_SLASH = "--"
NIXL_SUFFIX = ".bin"


def nixl_model(model: str) -> str:
    """The model part of a nixl_store_dynamic file name (injective, see above)."""
    ref = model.replace("/", NIXL_SLASH)
    if "%" not in model and ref.replace(NIXL_SLASH, "/") == model:
        return ref
    return "".join(_FS_ESCAPES.get(c, c) for c in model)


def nixl_name(key: ObjectKey) -> str:
    """File name of ``key`` for nixl_store_dynamic (example: model ``org/m``, world 1 rank 0,
    group 0, hash ``0101...``, salt ``s`` -> ``org--m_01000100_0_0101010101010101@s.bin``)."""
    salt = f"{SEP}{key.cache_salt}" if key.cache_salt else ""
    return (f"{nixl_model(key.model_name)}_{key.kv_rank:08x}_{key.object_group_id:x}_"
            f"{key.chunk_hash.hex()}{salt}{NIXL_SUFFIX}")  # fmt: skip


def nixl_relpath(key: ObjectKey, shard_dirs: bool) -> str:
    """Path of ``key``'s file relative to ``file_path``: the name, below
    ``<hash[0:2]>/<hash[2:4]>/`` with ``shard_dirs`` (as the reference joins them, so a hash
    shorter than 2 bytes gets fewer levels)."""
    if not shard_dirs:
        return nixl_name(key)
    digest = key.chunk_hash.hex()
    return "/".join(p for p in (digest[:2], digest[2:4], nixl_name(key)) if p)


def parse_nixl_name(name: str) -> ObjectKey | None:
    """Inverse of :func:`nixl_name`; None for any other name (temp files, foreign files)."""
    if not name.endswith(NIXL_SUFFIX):
        return None
    head, _, salt = name[: -len(NIXL_SUFFIX)].partition(SEP)
    parts = head.rsplit("_", 3)
    if len(parts) != 4:
        return None
    model = urllib.parse.unquote(parts[0]) if "%" in parts[0] else parts[0].replace(NIXL_SLASH, "/")
    key = _parse([*parts, salt], model)
    return key if key is not None and nixl_name(key) == name else None
