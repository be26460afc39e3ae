"""Real traffic for the observability, admin-API and dashboard tests: a real KvhiveServer,
real shared-memory KV caches and kvhive's own light client speaking the wire protocol
(register, store, lookup, retrieve)."""

from __future__ import annotations

import contextlib

from kvhive.client import KvhiveClient
from kvhive.server.core import KvhiveServer
from kvhive.wire import types as t
from support import servers
from support import shm as _shm
from support.net import free_port
from support.shm import KVGeometry, ShmKV

C = 32  # chunk size (tokens) of the test server
GEOMETRY = KVGeometry()
BS = GEOMETRY.block_size  # tokens per block
MODEL = "obs-model"


def running_server(*extra: str) -> contextlib.AbstractContextManager[KvhiveServer]:
    """:func:`support.servers.running_server` with chunk size :data:`C`, a Prometheus listener
    on a free port and HTTP bound to 127.0.0.1 (``extra`` last, so it wins)."""
    return servers.running_server(
        "--chunk-size", str(C), "--prometheus-port", str(free_port()),
        "--http-host", "127.0.0.1", *extra,
    )  # fmt: skip


def shm_kv() -> contextlib.AbstractContextManager[ShmKV]:
    """One worker's KV cache (:class:`support.shm.KVGeometry` defaults), random bytes from
    seed 3; unlinked on exit."""
    return _shm.shm_kv(3, prefix="kvhive_obs_", geometry=GEOMETRY)


def cache_key(tokens: list[int], rid: str, worker: int | None = 0) -> t.CacheKey:
    return t.CacheKey(MODEL, 1, worker, tokens, 0, len(tokens), rid, "", None, 1)


class Traffic:
    """Drives one registered worker against ``server`` through the wire protocol."""

    def __init__(self, server: KvhiveServer, kv: ShmKV, instance_id: int = 77) -> None:
        self.client = KvhiveClient(server.zmq.endpoints[0])
        self.iid = instance_id
        self.client.call(
            "register_kv_cache", instance_id, kv.wire_descriptors(), MODEL, 1, "vllm",
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
