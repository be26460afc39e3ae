"""A fake engine on kvhive's own client: real shared-memory KV caches in vLLM's CPU layout,
registered over the wire like the lmcache 0.5.6 worker does, then store / lookup / retrieve
requests sent by :class:`kvhive.client.KvhiveClient`.  No torch, no lmcache.

Works against any server speaking the protocol (kvhive or the reference ``lmcache server``).

Layout of one engine's cache (vLLM CPU, "HND"; MLA has one latent plane)::

    layer l: POSIX shm segment /kvhive_bench_<pid>_<n>_<l>
             [2, num_blocks, kv_heads, block_size, head_size]  (K/V, block, head, slot, dim)
             [num_blocks, block_size, head_size]                (MLA: block, slot, latent)
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import random
import time
from _posixshmem import shm_open, shm_unlink
from typing import Any

import msgspec
import numpy as np

from kvhive.bench.config import KVShape
from kvhive.client import KvhiveClient
from kvhive.wire import types as t

_SEGMENTS = itertools.count()
STUB_EVENT = b"stub_ipc_handle"  # what the 0.5.6 CPU client sends as its event handle


def make_tokens(seed: int, n: int, vocab: int = 50_000) -> list[int]:
    """``n`` deterministic token ids in ``[1, vocab)``."""
    rng = random.Random(seed)
    return [rng.randrange(1, vocab) for _ in range(n)]


def token_bytes(tokens: list[int]) -> bytes:
    """``tokens`` as a 0.5.7 key carries them: packed big-endian uint32, 4 bytes a token."""
    return np.asarray(tokens, dtype=">u4").tobytes()


class PackedCacheKey(msgspec.Struct, frozen=True):
    """0.5.7's ``IPCCacheServerKey`` as it travels (a msgpack map, fields in its order): the
    tokens as ``token_bytes`` (:func:`token_bytes`) instead of 0.5.6's ``token_ids``.  Only
    kvhive understands it; ``lmcache server`` 0.5.6 refuses it."""

    model_name: str
    world_size: int
    worker_id: int | None
    token_bytes: bytes
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict[str, Any] | None = None
    num_kv_readers: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_bytes) // 4


Tokens = list[int] | bytes
"""A request's tokens as the bench sends them: 0.5.6 ints, or 0.5.7 packed bytes."""


class ShmKVCache:
    """One engine's KV cache: a shm segment per layer, laid out as vLLM's CPU backend does
    (``KVShape.layer_dims``)."""

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.names: list[str] = []
        self._maps: list[mmap.mmap] = []
        self.layer_dims = shape.layer_dims(num_blocks, block_size)
        self.layer_bytes = shape.itemsize * int(np.prod(self.layer_dims))
        try:
            for layer in range(shape.layers):
                name = f"/kvhive_bench_{os.getpid()}_{next(_SEGMENTS)}_{layer}"
                fd = shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
                self.names.append(name)
                try:
                    os.ftruncate(fd, self.layer_bytes)
                    self._maps.append(mmap.mmap(fd, self.layer_bytes))
                finally:
                    os.close(fd)
        except BaseException:
            self.close()
            raise
        # uint16/uint32 views: numpy has no bfloat16, and the bench only moves bits.
        view = np.uint32 if shape.itemsize == 4 else np.uint16
        self.layers = [np.frombuffer(m, dtype=view).reshape(self.layer_dims) for m in self._maps]

    def fill(self, block_ids: list[int], seed: int) -> None:
        """Random bits in ``block_ids`` of every layer (touches the pages once)."""
        rng = np.random.default_rng(seed)
        idx = self.blocks(block_ids)
        for layer in self.layers:
            sub = layer[idx]
            layer[idx] = rng.integers(0, 1 << 15, size=sub.shape, dtype=layer.dtype)

    def blocks(self, block_ids: list[int]) -> tuple[slice | np.ndarray, ...]:
        """Index of ``block_ids`` along a layer's block axis."""
        return (slice(None),) * self.shape.block_axis + (np.asarray(block_ids),)

    def blocks_equal(self, a: list[int], b: list[int]) -> bool:
        ia, ib = self.blocks(a), self.blocks(b)
        return all(np.array_equal(layer[ia], layer[ib]) for layer in self.layers)

    def descriptors(self) -> list[msgspec.msgpack.Ext]:
        """The ext-1 ``cpu_shm`` wrappers ``register_kv_cache`` carries, one per layer."""
        shape = list(self.layer_dims)
        stride = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
        enc = msgspec.msgpack.Encoder()
        return [
            msgspec.msgpack.Ext(
                1,
                enc.encode(
                    {
                        "type": "cpu_shm",
                        "shm_name": name,
                        "nbytes": self.layer_bytes,
                        "version": 1,
                        "metadata": {
                            "dtype": self.shape.dtype,
                            "shape": shape,
                            "stride": stride,
                            "storage_offset": 0,
                            "device_uuid": "cpu",
                        },
                    }
                ),
            )
            for name in self.names
        ]

    def close(self) -> None:
        self.layers = []
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = []
        for name in self.names:
            with contextlib.suppress(FileNotFoundError):
                shm_unlink(name)
        self.names = []


class KvhiveEngine:
    """One fake lmcache-driven engine (scheduler + worker on one DEALER) on :class:`KvhiveClient`.

    Not thread-safe: one per thread.
    """

    def __init__(
        self,
        url: str,
        shape: KVShape,
        *,
        num_chunks: int,
        block_size: int = 16,
        model_name: str = "bench-model",
        instance_id: int | None = None,
        timeout: float = 120.0,
    ) -> None:
        """Connects and allocates a cache of ``1 + num_chunks * blocks per chunk`` blocks
        (block 0 is vLLM's null block, never used)."""
        self.shape = shape
        self.block_size = block_size
        self.model_name = model_name
        self.instance_id = instance_id or random.getrandbits(62)
        self.client = KvhiveClient(url, timeout=timeout)
        try:
            self.chunk_size = int(self.client.call("get_chunk_size"))
            if self.chunk_size % block_size:
                raise ValueError(f"chunk size {self.chunk_size} is not a multiple of {block_size}")
            self.blocks_per_chunk = self.chunk_size // block_size
            self.kv = ShmKVCache(shape, 1 + num_chunks * self.blocks_per_chunk, block_size)
        except BaseException:
            self.client.close()
            raise

    def chunk_blocks(self, first_chunk: int, n_chunks: int) -> list[int]:
        """Block ids of chunks ``[first_chunk, first_chunk + n_chunks)`` of this cache."""
        a = 1 + first_chunk * self.blocks_per_chunk
        return list(range(a, a + n_chunks * self.blocks_per_chunk))

    # -- protocol ------------------------------------------------------------------

    def register(self) -> None:
        groups = [
            {
                "engine_group_id": 0,
                "layer_indices": list(range(self.shape.layers)),
                "tokens_per_block": self.block_size,
                "sw_size_tokens": -1,
                "extra_object_group_tag": 0,
                "recurrent_state": False,
            }
        ]
        self.client.call(
            "register_kv_cache",
            self.instance_id,
            self.kv.descriptors(),
            self.model_name,
            1,
            "vllm",
            {"kv_layout": "HND"},
            groups,
        )

    def key(
        self, rid: str, tokens: Tokens, start: int, end: int, *, worker: int | None = 0
    ) -> t.CacheKey | PackedCacheKey:
        """The request key: 0.5.6's form for a token list, 0.5.7's (``token_bytes``) for
        packed tokens (:func:`token_bytes`)."""
        if isinstance(tokens, bytes):
            return PackedCacheKey(self.model_name, 1, worker, tokens, start, end, rid, "", None, 1)
        return t.CacheKey(self.model_name, 1, worker, tokens, start, end, rid, "", None, 1)

    def store(self, rid: str, tokens: list[int], blocks: list[int], start: int, end: int) -> bool:
        reply = self.client.call(
            "store", self.key(rid, tokens, start, end), self.instance_id, [blocks], STUB_EVENT
        )
        return bool(reply[1])

    def retrieve(
        self, rid: str, tokens: list[int], blocks: list[int], start: int, end: int
    ) -> bool:
        reply = self.client.call(
            "retrieve", self.key(rid, tokens, start, end), self.instance_id, [blocks], STUB_EVENT, 0
        )
        return bool(reply[1])

    def lookup(self, rid: str, tokens: Tokens, end: int | None = None) -> int:
        """Lookup then status polls (no sleep) until the result; returns hit chunks.
        ``tokens`` as :meth:`key` takes them (packed bytes: a 0.5.7 key, kvhive only)."""
        n_tokens = len(tokens) // 4 if isinstance(tokens, bytes) else len(tokens)
        end = n_tokens // self.chunk_size * self.chunk_size if end is None else end
        self.client.call("lookup", self.key(rid, tokens, 0, end, worker=None), 1)
        while True:
            hit = self.client.call("query_prefetch_status", rid)
            if hit is not None:
                return int(hit)

    def end_session(self, rid: str) -> None:
        self.client.call("end_session", rid)

    def noop(self) -> Any:
        return self.client.call("noop")

    def close(self, unregister: bool = True) -> None:
        if unregister:
            with contextlib.suppress(Exception):
                self.client.call("unregister_kv_cache", self.instance_id)
        self.client.close()
        self.kv.close()

    def __enter__(self) -> KvhiveEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out
