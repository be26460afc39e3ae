"""Named key types: chunk hashes, object keys, instance and request ids.

An ``ObjectKey`` names one L1/L2 object: one chunk of one object group for one
KV rank.  Field rules follow LMCache 0.5.6 (``v1/distributed/api.py``) because
L2 object names derive from them.
"""

from __future__ import annotations

from typing import NamedTuple, NewType

ChunkHash = NewType("ChunkHash", bytes)
InstanceId = NewType("InstanceId", int)
RequestId = NewType("RequestId", str)

MAX_SALT_LEN = 128
_SALT_FORBIDDEN = ("@", "/", "\\", "\x00")


def pack_kv_rank(world_size: int, rank: int) -> int:
    """Pack a parallel position, one byte per field: world, rank, local world, local rank.

    In the MP server local == global, so world 1 rank 0 is 0x01000100.
    """
    if not (0 < world_size < 256 and 0 <= rank < world_size):
        raise ValueError(f"world_size {world_size} / rank {rank} out of range")
    return (world_size << 24) | (rank << 16) | (world_size << 8) | rank


def unpack_kv_rank(kv_rank: int) -> tuple[int, int]:
    """Inverse of ``pack_kv_rank``: (world_size, rank)."""
    return (kv_rank >> 24) & 0xFF, (kv_rank >> 16) & 0xFF


def validate_salt(cache_salt: str) -> str:
    """Return ``cache_salt`` or raise ValueError when it breaks the naming rules."""
    if len(cache_salt) > MAX_SALT_LEN or any(c in cache_salt for c in _SALT_FORBIDDEN):
        raise ValueError(f"invalid cache_salt {cache_salt[:32]!r}: <=128 chars, no @ / \\ NUL")
    return cache_salt


class ObjectKey(NamedTuple):
    """Identity of one stored chunk object (hashable, immutable).

    A tuple: keys are built and hashed several times per request (object table, locks,
    eviction order), and a tuple's construction, hash and equality run in C, three to four
    times faster than a frozen dataclass's.  Object keys live in their own tables, never
    mixed with plain tuples that could compare equal.
    """

    chunk_hash: bytes
    model_name: str
    kv_rank: int
    object_group_id: int = 0
    cache_salt: str = ""

    @property
    def rank(self) -> int:
        return unpack_kv_rank(self.kv_rank)[1]
