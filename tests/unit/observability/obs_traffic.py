"""Real traffic for observability tests: a real KvhiveServer, real shared-memory KV caches and
kvhive's own light client speaking the wire protocol (register, store, lookup, retrieve)."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import uuid
from _posixshmem import shm_open, shm_unlink
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from kvhive.client import KvhiveClient
from kvhive.config import parse_server_args
from kvhive.server.core import KvhiveServer
from kvhive.wire import types as t

C = 32  # chunk size (tokens) of the test server
BS = 16  # tokens per block
NB = 24  # blocks per layer
NH, HS, NL = 2, 8, 3
MODEL = "obs-model"
_enc = msgspec.msgpack.Encoder()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(*extra: str) -> list[str]:
    return [
        "--host", "127.0.0.1", "--port", str(free_port()), "--chunk-size", str(C),
        "--l1-size-gb", "0.0625", "--eviction-policy", "LRU",
        "--prometheus-port", str(free_port()), "--http-host", "127.0.0.1", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def running_server(*extra: str) -> Iterator[KvhiveServer]:
    server = KvhiveServer(parse_server_args(server_args(*extra)))
    server.start()
    try:
        yield server
    finally:
        server.close()


@dataclass
class KV:
    """One worker's KV cache: per-layer [NB, NH, BS, 2*HS] fp16 in its own shm segment."""

    names: list[str]
    maps: list[mmap.mmap]

    def descriptors(self) -> list[msgspec.msgpack.Ext]:
        shape = [NB, NH, BS, 2 * HS]
        stride = [NH * BS * 2 * HS, BS * 2 * HS, 2 * HS, 1]
        return [
            msgspec.msgpack.Ext(
                1,
                _enc.encode(
                    {
                        "version": 1,
                        "metadata": {
                            "dtype": "float16",
                            "shape": shape,
                            "stride": stride,
                            "storage_offset": 0,
                            "device_uuid": "cpu",
                        },
                        "shm_name": "/" + n,
                        "nbytes": NB * NH * BS * 2 * HS * 2,
                        "type": "cpu_shm",
                    }
                ),
            )  # fmt: skip
            for n in self.names
        ]


@contextlib.contextmanager
def shm_kv() -> Iterator[KV]:
    size = NB * NH * BS * 2 * HS * 2
    names, maps = [], []
    rng = np.random.default_rng(3)
    try:
        for _ in range(NL):
            name = f"kvhive_obs_{uuid.uuid4().hex[:10]}"
            fd = shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
            os.close(fd)
            m[:] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            names.append(name)
            maps.append(m)
        yield KV(names, maps)
    finally:
        for m in maps:
            m.close()
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                shm_unlink("/" + n)


def cache_key(tokens: list[int], rid: str, worker: int | None = 0) -> t.CacheKey:
    return t.CacheKey(MODEL, 1, worker, tokens, 0, len(tokens), rid, "", None, 1)


class Traffic:
    """Drives one registered worker against ``server`` through the wire protocol."""

    def __init__(self, server: KvhiveServer, kv: KV, instance_id: int = 77) -> None:
        self.client = KvhiveClient(server.zmq.endpoints[0])
        self.iid = instance_id
        self.client.call(
            "register_kv_cache", instance_id, kv.descriptors(), MODEL, 1, "vllm",
            {"kv_layout": "HND"}, [],
        )  # fmt: skip

    def store(self, tokens: list[int], rid: str, blocks: list[int]) -> None:
        assert self.client.call("store", cache_key(tokens, rid), self.iid, [blocks], b"") == [
            b"",
            True,
        ]

    def lookup(self, tokens: list[int], rid: str) -> int:
        self.client.call("lookup", cache_key(tokens, rid, worker=None), 1)
        hits = None
        while hits is None:
            hits = self.client.call("query_prefetch_status", rid)
        return hits

    def retrieve(self, tokens: list[int], rid: str, blocks: list[int]) -> bool:
        got = self.client.call("retrieve", cache_key(tokens, rid), self.iid, [blocks], b"", 0)
        return bool(got[1])

    def end(self, rid: str) -> None:
        self.client.call("end_session", rid)

    def close(self) -> None:
        self.client.close()

    def round(self, n_chunks: int, rid: str, *, offset: int = 1) -> int:
        """Store n chunks, look them up, retrieve them, end the session; returns the hits."""
        tokens = list(range(offset, offset + n_chunks * C))
        blocks = list(range(1, 1 + n_chunks * C // BS))
        self.store(tokens, rid, blocks)
        hits = self.lookup(tokens, rid)
        assert self.retrieve(tokens[: hits * C], rid, list(range(12, 12 + hits * C // BS)))
        self.end(rid)
        return hits
