"""Token chunk hashing: the chained chunk keys of protocol §9, bit-identical to the reference.

::

    h_0 = NONE_HASH
    h_k = H((h_{k-1}, tuple(tokens[(k-1)*C : k*C]), None))      k = 1, 2, ...   (whole chunks only)

=============  ==========================================  =====================================
algorithm      H                                           NONE_HASH
=============  ==========================================  =====================================
blake3         BLAKE3(parent || tokens as u32 big-endian)  BLAKE3(8 zero bytes || 4 zero bytes)
sha256_cbor    SHA-256(canonical CBOR [parent, [tok..], null])  SHA-256(CBOR text string seed)
builtin        Python hash() of the tuple (int, 8 bytes)   hash((0, (0,), None))
=============  ==========================================  =====================================

Chunk hashes are ``bytes``: 32 for blake3/sha256_cbor, 8 (big-endian, signed) for builtin.
Token ids must be integers in 0..2**32-1 for every algorithm (real vocabularies are far
smaller); anything else raises :class:`~kvhive.errors.BadRequest`, never a crash.

Tokens arrive as ints (a 0.5.6 key's ``token_ids``, a numpy array) or packed
(:class:`~kvhive.wire.types.PackedTokens`, a 0.5.7 key's ``token_bytes``: big-endian uint32,
exactly the bytes blake3 hashes).  blake3 hashes packed tokens as they are, without
making ints; sha256_cbor and builtin hash Python ints, read from the bytes by numpy.
"""

from __future__ import annotations

import array
import hashlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import numpy as np
from blake3 import blake3

from kvhive import envs
from kvhive.errors import BadRequest
from kvhive.wire.types import PackedTokens

logger = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = ("builtin", "sha256_cbor", "blake3")
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
"""vLLM's sha256_cbor NONE_HASH seed when PYTHONHASHSEED is unset (vLLM >= 0.33)."""

U32_MAX = 0xFFFF_FFFF
_U32_CODE = next(code for code in "IL" if array.array(code).itemsize == 4)
_SWAP_TO_BIG_ENDIAN = sys.byteorder == "little"

# A chain step: (parent hash in the algorithm's native form, the tokens -- big-endian
# uint32 bytes for blake3, Python ints for the others --, chunk size) -> hashes.
_Chain = Callable[[Any, Any, int], list[bytes]]


def default_none_hash_seed() -> str:
    """$PYTHONHASHSEED if set (as vLLM reads it), else ``"vllm-none-hash"``."""
    seed = envs.PYTHONHASHSEED
    return DEFAULT_NONE_HASH_SEED if seed is None else seed


# -- token validation --------------------------------------------------------------------------


def _u32_tokens(token_ids: Sequence[int] | np.ndarray) -> array.array[int]:
    """Token ids as a native uint32 array (one C-level conversion); BadRequest when invalid."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.dtype.kind not in "iu" or (
            token_ids.size and (token_ids.min() < 0 or token_ids.max() > U32_MAX)
        ):
            raise BadRequest("token ids must be integers in 0..4294967295")
        return array.array(_U32_CODE, token_ids.astype(np.uint32).tobytes())
    try:
        return array.array(_U32_CODE, token_ids)
    except (OverflowError, TypeError, ValueError):
        raise _bad_token(token_ids) from None


def _bad_token(token_ids: Any) -> BadRequest:
    # Error path only: find the first offender for a precise message.
    try:
        for index, token in enumerate(token_ids):
            if not isinstance(token, int) or not 0 <= token <= U32_MAX:
                return BadRequest(
                    f"token_ids[{index}] = {token!r} is not an integer in 0..{U32_MAX}"
                )
    except TypeError:
        pass
    return BadRequest(f"token ids must be a sequence of integers in 0..{U32_MAX}")


# -- the three algorithms ----------------------------------------------------------------------


def _big_endian(tokens: Sequence[int] | np.ndarray | PackedTokens) -> memoryview:
    """The tokens as big-endian uint32 bytes: a packed key's own bytes, else one validated
    C-level conversion (BadRequest for an id outside 0..2**32-1)."""
    if isinstance(tokens, PackedTokens):
        return tokens.data
    words = _u32_tokens(tokens)
    if _SWAP_TO_BIG_ENDIAN:
        words.byteswap()  # in place; the array is our private copy
    return memoryview(words).cast("B")


def _ints(tokens: Sequence[int] | np.ndarray | PackedTokens) -> list[int]:
    """The tokens as validated Python ints (sha256_cbor and builtin hash ints)."""
    if isinstance(tokens, PackedTokens):
        return np.frombuffer(tokens.data, dtype=">u4").tolist()
    return _u32_tokens(tokens).tolist()


def _chain_blake3(parent: bytes, data: memoryview, chunk_size: int) -> list[bytes]:
    step = 4 * chunk_size
    out: list[bytes] = []
    for offset in range(0, len(data), step):
        hasher = blake3(parent)
        hasher.update(data[offset : offset + step])
        parent = hasher.digest()
        out.append(parent)
    return out


def _sha256_cbor(obj: Any) -> bytes:
    # vLLM's sha256_cbor: canonical CBOR, tuples as arrays, bytes as byte strings, None as null.
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _chain_sha256_cbor(parent: bytes, ints: list[int], chunk_size: int) -> list[bytes]:
    out: list[bytes] = []
    for start in range(0, len(ints), chunk_size):
        parent = _sha256_cbor((parent, tuple(ints[start : start + chunk_size]), None))
        out.append(parent)
    return out


def _chain_builtin(parent: int, ints: list[int], chunk_size: int) -> list[bytes]:
    out: list[bytes] = []
    for start in range(0, len(ints), chunk_size):
        parent = hash((parent, tuple(ints[start : start + chunk_size]), None))
        out.append(parent.to_bytes(8, "big", signed=True))
    return out


_CHAINS: dict[str, _Chain] = {
    "blake3": _chain_blake3,
    "sha256_cbor": _chain_sha256_cbor,
    "builtin": _chain_builtin,
}


# -- the hasher --------------------------------------------------------------------------------


class TokenHasher:
    """Chained chunk hashes for one algorithm and chunk size.  Stateless and thread-safe.

    ``none_hash_seed`` only matters for sha256_cbor; None means :func:`default_none_hash_seed`.
    """

    __slots__ = (
        "algorithm",
        "chunk_size",
        "none_hash",
        "none_hash_seed",
        "digest_size",
        "_chain",
        "_tokens",
        "_none_parent",
    )

    def __init__(self, algorithm: str, chunk_size: int, none_hash_seed: str | None = None) -> None:
        if algorithm not in _CHAINS:
            raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {ALGORITHMS}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
        self.algorithm = algorithm
        self.chunk_size = chunk_size
        self._chain = _CHAINS[algorithm]
        # What the chain hashes: big-endian bytes (blake3) or ints (the others).
        self._tokens: Callable[[Any], Any] = _big_endian if algorithm == "blake3" else _ints
        self.none_hash_seed: str | None = None
        if algorithm == "blake3":
            # H((0, (0,), None)): the int prefix 0 as 8 bytes, then the single token 0 as 4 bytes.
            self._none_parent: Any = blake3(bytes(12)).digest()
            self.none_hash: bytes = self._none_parent
        elif algorithm == "sha256_cbor":
            self.none_hash_seed = (
                default_none_hash_seed() if none_hash_seed is None else none_hash_seed
            )
            self._none_parent = _sha256_cbor(self.none_hash_seed)
            self.none_hash = self._none_parent
        else:
            self._none_parent = hash((0, (0,), None))
            self.none_hash = self._none_parent.to_bytes(8, "big", signed=True)
        self.digest_size = len(self.none_hash)

    def __repr__(self) -> str:
        return f"TokenHasher({self.algorithm!r}, chunk_size={self.chunk_size}, none_hash={self.none_hash.hex()})"

    def _parent(self, start_hash: bytes | None) -> Any:
        if start_hash is None:
            return self._none_parent
        if len(start_hash) != self.digest_size:
            raise ValueError(
                f"start_hash must be {self.digest_size} bytes for {self.algorithm} (got {len(start_hash)})"
            )
        if self.algorithm == "builtin":
            return int.from_bytes(start_hash, "big", signed=True)  # the chain runs on ints
        return bytes(start_hash)

    def chunk_hashes(
        self,
        token_ids: Sequence[int] | np.ndarray | PackedTokens,
        end: int | None = None,
        start_hash: bytes | None = None,
    ) -> list[bytes]:
        """Hashes of the whole chunks of ``token_ids[:end]``, chained from ``start_hash``.

        ``end`` (tokens) is clamped to ``len(token_ids)`` and then down to a chunk boundary, so
        a trailing partial chunk is never hashed.  ``start_hash`` is the hash of the chunk
        before ``token_ids[0]`` (default NONE_HASH, i.e. ``token_ids`` starts the sequence).
        Raises BadRequest for a negative ``end`` or a token outside 0..2**32-1.
        """
        length = len(token_ids)
        if end is not None:
            if end < 0:
                raise BadRequest(f"end must be >= 0 (got {end})")
            length = min(length, end)
        length -= length % self.chunk_size
        parent = self._parent(start_hash)
        if length == 0:
            return []
        if length < len(token_ids):
            token_ids = token_ids[:length]  # slice only when needed: copying 100k ids costs ~0.1 ms
        return self._chain(parent, self._tokens(token_ids), self.chunk_size)

    def extend(
        self,
        prev_hashes: Sequence[bytes],
        token_ids: Sequence[int] | np.ndarray | PackedTokens,
        upto_chunks: int,
    ) -> list[bytes]:
        """The hashes of chunks ``len(prev_hashes) .. upto_chunks-1`` of ``token_ids``.

        ``prev_hashes`` are the already computed hashes of the first chunks of the same token
        sequence (a session's cache); only the missing chunks are hashed and returned, so a
        caller appends the result: ``cached += hasher.extend(cached, tokens, end // C)``.
        Returns ``[]`` when nothing is missing.  Raises BadRequest when ``upto_chunks`` whole
        chunks exceed ``token_ids``.
        """
        have = len(prev_hashes)
        if upto_chunks <= have:
            return []
        stop = upto_chunks * self.chunk_size
        if stop > len(token_ids):
            raise BadRequest(f"end {stop} exceeds the {len(token_ids)} token(s) of the request")
        start_hash = prev_hashes[-1] if have else None
        return self.chunk_hashes(token_ids[have * self.chunk_size : stop], start_hash=start_hash)


def build_token_hasher(
    algorithm: str, chunk_size: int, none_hash_seed: str | None = None
) -> TokenHasher:
    """Create the server's hasher and log what it hashes with (and loudly when it is unstable)."""
    hasher = TokenHasher(algorithm, chunk_size, none_hash_seed)
    seed = f" seed={hasher.none_hash_seed!r}" if hasher.none_hash_seed is not None else ""
    logger.info(
        "token hasher: algorithm=%s chunk_size=%d NONE_HASH=%s%s",
        algorithm,
        chunk_size,
        hasher.none_hash.hex(),
        seed,
    )
    if algorithm == "builtin":
        logger.warning(
            "--hash-algorithm builtin is only stable within one process: chunk keys will not "
            "match after a restart or on another server; use blake3 or sha256_cbor"
        )
    return hasher
