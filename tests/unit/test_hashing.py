"""Known-answer tests of kvhive.hashing (protocol §9).

Vectors marked "reference" were produced by running the real lmcache 0.5.6
``lmcache.v1.multiprocess.token_hasher.TokenHasher(chunk_size, "blake3").compute_chunk_hashes``
(Python 3.11.7, venv-probe) on the inputs written next to them and hard-coding the hex output.
The sha256_cbor vectors come from protocol.md §9.3 (they match vLLM's sha256_cbor and
init_none_hash); the reference cannot produce them without vLLM installed.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import typing

import numpy as np
import pytest
from blake3 import blake3

from kvhive import hashing
from kvhive.config import HashAlgorithm
from kvhive.errors import BadRequest
from kvhive.hashing import TokenHasher, build_token_hasher, default_none_hash_seed

BLAKE3_NONE_HASH = "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"
SHA256_CBOR_NONE_HASH = "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"

# reference: chunk_size=4, compute_chunk_hashes([1..9]) (the 9th token is a partial chunk)
BLAKE3_C4 = [
    "6309ed506b8721905753f5c73c070bb21c3aafbd9b474b1e231f41368b71123c",
    "98efc76eafb06cfe774c31ff151f300b61a614c27982a211bb8cdbd83a8c0e19",
]
# reference: chunk_size=256, tokens [(i * 7919 + 13) % 151936 for i in range(1024)]
TOKENS_1024 = [(i * 7919 + 13) % 151936 for i in range(1024)]
BLAKE3_C256 = [
    "fe8641a3e835f0ac41cd4389da324ac27db4498b9d00111a86ac97a34a04573b",
    "bcc5cda303545b203b48e0f17abf73bdcc724b9a3abde7fcadb7fb389c0c9947",
    "36a7fc108b5d63f8920709fe347a2b6c138c0fe4e71a662f3b4c754237e6be6c",
    "ca994f1e27f962ce4a5afeafd9561622f0a4f57e4fc424242916e084bdbcfeea",
]
# reference: chunk_size=16, tokens EXTREMES + EXTREMES[::-1] (uint32 edges, byte order)
EXTREMES = [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 23, 24, 1000, 100000, 151935, 7, 2**32 - 2]  # fmt: skip
BLAKE3_C16_EXTREMES = [
    "7cca00b05c7e35d4b04cd60e4a83798c8a383773da7ad144d57873f5e725267a",
    "e7b755154dfd0d442db370e59680ba5454207a19c00260c02327c4b7d5b5cba8",
]
# reference: chunk_size=4, compute_chunk_hashes([10, 20, ..., 80], prefix_hash=bytes(range(32)))
BLAKE3_C4_PREFIXED = [
    "a63f7f9bab6b703c1994a8c2e212ad58423c79971da0c812a5b6fd7390395185",
    "c08fae02adf3a1b334b7e65522e5b58c5b7193fbd2d045a7bd74e835ca7b3451",
]
# reference: chunk_size=1, compute_chunk_hashes([0, 0, 0])
BLAKE3_C1_ZEROS = [
    "2eddf2cbf072f71f8e6b766cdd3096880ba606cf90e505269042228550c9eeb0",
    "5f5deacaa82398ba288dbede9994dcb1761047b2033144eb8906f83df4b60f19",
    "d9f10ee8bf3f1b2a0be4ab56caa6d8e15b805a78f4d6746853123a528664fe5f",
]


def hexes(hashes: list[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


@pytest.fixture(autouse=True)
def _no_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


# -- blake3 ------------------------------------------------------------------------------------


def test_blake3_none_hash() -> None:
    hasher = TokenHasher("blake3", 4)
    assert hasher.none_hash.hex() == BLAKE3_NONE_HASH
    assert hasher.none_hash == blake3(bytes(12)).digest()
    assert hasher.digest_size == 32


@pytest.mark.parametrize(
    ("chunk_size", "tokens", "start_hash", "expected"),
    [
        (4, list(range(1, 10)), None, BLAKE3_C4),
        (256, TOKENS_1024, None, BLAKE3_C256),
        (16, EXTREMES + EXTREMES[::-1], None, BLAKE3_C16_EXTREMES),
        (4, [10, 20, 30, 40, 50, 60, 70, 80], bytes(range(32)), BLAKE3_C4_PREFIXED),
        (1, [0, 0, 0], None, BLAKE3_C1_ZEROS),
    ],
    ids=["c4-spec", "c256", "c16-extremes", "c4-prefixed", "c1-zeros"],
)
def test_blake3_reference_vectors(
    chunk_size: int, tokens: list[int], start_hash: bytes | None, expected: list[str]
) -> None:
    hasher = TokenHasher("blake3", chunk_size)
    assert hexes(hasher.chunk_hashes(tokens, start_hash=start_hash)) == expected


def test_blake3_matches_its_definition() -> None:
    # H = BLAKE3(parent || tokens as big-endian u32), written out with struct, chunk by chunk.
    hasher = TokenHasher("blake3", 8)
    tokens = [(i * 104729) % 2**32 for i in range(40)]
    parent = hasher.none_hash
    expected = []
    for start in range(0, 40, 8):
        parent = blake3(parent + struct.pack(">8I", *tokens[start : start + 8])).digest()
        expected.append(parent)
    assert hasher.chunk_hashes(tokens) == expected


def test_blake3_accepts_tuples_and_numpy_arrays() -> None:
    hasher = TokenHasher("blake3", 256)
    for form in (tuple(TOKENS_1024), np.array(TOKENS_1024, dtype=np.int64), np.array(TOKENS_1024, dtype=np.uint32)):  # fmt: skip
        assert hexes(hasher.chunk_hashes(form)) == BLAKE3_C256


# -- sha256_cbor -------------------------------------------------------------------------------


def test_sha256_cbor_spec_vectors() -> None:
    hasher = TokenHasher("sha256_cbor", 4)
    assert hasher.none_hash_seed == "vllm-none-hash"
    assert hasher.none_hash.hex() == SHA256_CBOR_NONE_HASH
    assert hexes(hasher.chunk_hashes([1, 2, 3, 4, 5])) == [
        "58d0879dff3800f65f8c5fd449d73048c0f7699dd238a03b84b146b151d55111"
    ]


def _cbor_uint(value: int, major: int = 0) -> bytes:
    """Shortest-form CBOR head, written out by hand (independent of cbor2)."""
    top = major << 5
    if value < 24:
        return bytes([top | value])
    for extra, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if value < 256 ** struct.calcsize(fmt):
            return bytes([top | extra]) + struct.pack(fmt, value)
    raise ValueError(value)


def _sha256_cbor_by_hand(parent: bytes, tokens: list[int]) -> bytes:
    # [parent: bytes, tokens: array of uint, null] per protocol §9.3
    encoded = b"\x83" + _cbor_uint(len(parent), 2) + parent + _cbor_uint(len(tokens), 4)
    encoded += b"".join(_cbor_uint(t) for t in tokens) + b"\xf6"
    return hashlib.sha256(encoded).digest()


def test_sha256_cbor_matches_hand_encoding_across_integer_widths() -> None:
    tokens = EXTREMES * 2  # 0..23 (1 byte), 24..255, 256..65535, up to 2**32-1: every head size
    hasher = TokenHasher("sha256_cbor", 16, none_hash_seed="seed")
    seed_cbor = _cbor_uint(len(b"seed"), 3) + b"seed"  # CBOR text string
    assert hasher.none_hash == hashlib.sha256(seed_cbor).digest()
    parent, expected = hasher.none_hash, []
    for start in range(0, len(tokens), 16):
        parent = _sha256_cbor_by_hand(parent, tokens[start : start + 16])
        expected.append(parent)
    assert hasher.chunk_hashes(tokens) == expected
    long_chunk = TokenHasher("sha256_cbor", 300, none_hash_seed="seed")  # 2-byte array length
    assert long_chunk.chunk_hashes(list(range(300))) == [
        _sha256_cbor_by_hand(long_chunk.none_hash, list(range(300)))
    ]


def test_sha256_cbor_seed_from_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    assert default_none_hash_seed() == "0"
    hasher = TokenHasher("sha256_cbor", 4)
    assert hasher.none_hash_seed == "0"
    assert hasher.none_hash == hashlib.sha256(b"\x610").digest()  # text string "0"
    explicit = TokenHasher("sha256_cbor", 4, none_hash_seed="vllm-none-hash")
    assert explicit.none_hash.hex() == SHA256_CBOR_NONE_HASH


# -- builtin -----------------------------------------------------------------------------------


def test_builtin_is_python_hash_of_the_tuple_chain() -> None:
    # Only reproducible within one process (hash(None) varies on 3.11), so no fixed vectors.
    hasher = TokenHasher("builtin", 3)
    none = hash((0, (0,), None))
    assert hasher.none_hash == none.to_bytes(8, "big", signed=True)
    h1 = hash((none, (1, 2, 3), None))
    h2 = hash((h1, (4, 5, 6), None))
    expected = [h.to_bytes(8, "big", signed=True) for h in (h1, h2)]
    assert hasher.chunk_hashes([1, 2, 3, 4, 5, 6, 7]) == expected
    assert hasher.digest_size == 8
    # Chaining from a previous 8-byte hash continues the int chain.
    assert hasher.chunk_hashes([4, 5, 6], start_hash=expected[0]) == expected[1:]


# -- chain semantics (all algorithms) ----------------------------------------------------------

ALL = list(typing.get_args(HashAlgorithm))


def test_algorithm_names_match_the_config_choices() -> None:
    assert set(hashing.ALGORITHMS) == set(ALL)


@pytest.mark.parametrize("algorithm", ALL)
def test_end_is_clamped_down_to_whole_chunks(algorithm: str) -> None:
    hasher = TokenHasher(algorithm, 256)
    full = hasher.chunk_hashes(TOKENS_1024)
    assert len(full) == 4
    assert hasher.chunk_hashes(TOKENS_1024, end=700) == full[:2]
    assert hasher.chunk_hashes(TOKENS_1024, end=768) == full[:3]
    assert hasher.chunk_hashes(TOKENS_1024, end=10_000) == full
    assert hasher.chunk_hashes(TOKENS_1024[:1000]) == full[:3]
    assert hasher.chunk_hashes(TOKENS_1024, end=255) == []
    assert hasher.chunk_hashes([]) == []


@pytest.mark.parametrize("algorithm", ALL)
def test_start_hash_continues_the_chain(algorithm: str) -> None:
    hasher = TokenHasher(algorithm, 256)
    full = hasher.chunk_hashes(TOKENS_1024)
    assert hasher.chunk_hashes(TOKENS_1024[512:], start_hash=full[1]) == full[2:]


@pytest.mark.parametrize("algorithm", ALL)
def test_extend_hashes_only_missing_chunks(algorithm: str) -> None:
    hasher = TokenHasher(algorithm, 256)
    full = hasher.chunk_hashes(TOKENS_1024)
    cached: list[bytes] = []
    cached += hasher.extend(cached, TOKENS_1024[:600], 2)  # a session's first store
    assert cached == full[:2]
    cached += hasher.extend(cached, TOKENS_1024, 4)  # the request grew
    assert cached == full
    assert hasher.extend(cached, TOKENS_1024, 3) == []  # already known
    with pytest.raises(BadRequest, match="exceeds"):
        hasher.extend(cached, TOKENS_1024, 5)


@pytest.mark.parametrize("algorithm", ALL)
@pytest.mark.parametrize(
    "bad",
    [-1, 2**32, 2**64, 1.5, "7", None],
    ids=["negative", "2**32", "2**64", "float", "str", "none"],
)
def test_invalid_tokens_raise_bad_request(algorithm: str, bad: object) -> None:
    hasher = TokenHasher(algorithm, 4)
    with pytest.raises(BadRequest, match=r"token_ids\[5\]"):
        hasher.chunk_hashes([1, 2, 3, 4, 5, bad, 7, 8])  # type: ignore[list-item]
    # A bad token in the ignored partial chunk is never looked at, as in the reference.
    assert len(hasher.chunk_hashes([1, 2, 3, 4, bad])) == 1  # type: ignore[list-item]


def test_invalid_numpy_tokens_raise_bad_request() -> None:
    hasher = TokenHasher("blake3", 2)
    for bad in (np.array([1, -1]), np.array([1, 2**32]), np.array([1.0, 2.0])):
        with pytest.raises(BadRequest):
            hasher.chunk_hashes(bad)


def test_negative_end_is_bad_request() -> None:
    with pytest.raises(BadRequest, match="end"):
        TokenHasher("blake3", 4).chunk_hashes([1, 2, 3, 4], end=-4)


def test_constructor_rejects_programming_errors() -> None:
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        TokenHasher("md5", 4)
    with pytest.raises(ValueError, match="chunk_size"):
        TokenHasher("blake3", 0)
    with pytest.raises(ValueError, match="start_hash"):
        TokenHasher("blake3", 4).chunk_hashes([1, 2, 3, 4], start_hash=b"short")


def test_factory_logs_none_hash_and_warns_for_builtin(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvhive.hashing")
    build_token_hasher("blake3", 256)
    assert BLAKE3_NONE_HASH in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    build_token_hasher("builtin", 256)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "only stable within one process" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
