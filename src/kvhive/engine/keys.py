"""Turning a wire ``CacheKey`` into object keys and lock owners."""

from __future__ import annotations

from kvhive.errors import BadRequest
from kvhive.keys import ChunkHash, ObjectKey, RequestId, pack_kv_rank, validate_salt
from kvhive.storage.owners import LookupOwner
from kvhive.wire.types import CacheKey


def kv_rank_of(key: CacheKey) -> int:
    """Packed rank of a worker key (``worker_id`` set)."""
    try:
        return pack_kv_rank(key.world_size, key.worker_id or 0)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def all_ranks(key: CacheKey) -> list[int]:
    """Packed ranks a scheduler key (``worker_id`` nil) expands to."""
    try:
        return [pack_kv_rank(key.world_size, r) for r in range(key.world_size)]
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def object_keys(key: CacheKey, hashes: list[ChunkHash], kv_rank: int) -> list[ObjectKey]:
    """One object key per chunk hash, for ``kv_rank``; BadRequest on a bad salt or model."""
    try:
        salt = validate_salt(key.cache_salt)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if "@" in key.model_name:
        raise BadRequest("model_name must not contain '@'")
    return [ObjectKey(h, key.model_name, kv_rank, 0, salt) for h in hashes]


def lookup_owner(key: CacheKey, kv_rank: int) -> LookupOwner:
    """Owner of the read locks ``key``'s request took (by lookup) on ``kv_rank``'s objects."""
    return LookupOwner(RequestId(key.request_id), key.model_name, kv_rank)


def chunk_range(key: CacheKey, chunk_size: int, *, aligned: bool) -> tuple[int, int]:
    """(first chunk, end chunk) of ``key``'s token range."""
    if key.start < 0 or key.end < key.start:
        raise BadRequest(f"bad token range [{key.start}, {key.end})")
    if key.end > len(key.token_ids):
        raise BadRequest(f"range end {key.end} beyond {len(key.token_ids)} tokens")
    if aligned and key.start % chunk_size:
        raise BadRequest(f"range start {key.start} is not chunk-aligned ({chunk_size})")
    # A trailing partial chunk takes no part in hashing or storage.
    return key.start // chunk_size, key.end // chunk_size
