"""A fake lmcache-driven engine for the segment tests (a script, run as a subprocess).

It creates its KV cache the way the lmcache 0.5.6 client does -- one POSIX segment per layer,
named ``lmcache_kv_<pid>_<n>`` after its own pid, kept mapped -- registers it with a kvhive
server over kvhive's own client, pings, prints one JSON line ``{"ready": true, "pid",
"names", "instance_id"}``, and then serves one JSON command per stdin line with one JSON
answer per stdout line:

    {"op": "store", "seed": S, "first": F, "chunks": N}     -> {"ok": bool}
    {"op": "retrieve", "seed": S, "first": F, "chunks": N}  -> {"ok": bool, "hit": chunks}
    {"op": "equal", "a": F1, "b": F2, "chunks": N}          -> {"equal": bool}
    {"op": "truncate", "nbytes": B}    ftruncate every segment to B bytes -> {"ok": true}
    {"op": "register"} / {"op": "ping"}                     -> {"ok": true}
    {"op": "exit"}                     unregister, unlink, exit

(``F`` is a chunk index: chunk ``F`` uses blocks ``1 + F * blocks_per_chunk ...``.)

``--ns-pid N``: run as the init of a fresh PID namespace (``unshare --pid --fork
--mount-proc``): set the namespace's next pid so that the engine, forked next, has pid ``N``
there, then run it and exit with its status.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import random
import subprocess
import sys
from _posixshmem import shm_open, shm_unlink
from typing import Any

import msgspec
import numpy as np

from kvhive.client import KvhiveClient
from kvhive.wire import types as t

LAYERS, HEADS, HEAD_SIZE, BLOCK = 2, 2, 16, 16
STUB_EVENT = b"stub_ipc_handle"
_SEGMENTS = itertools.count()


class Engine:
    def __init__(self, url: str, chunks: int, model: str) -> None:
        self.client = KvhiveClient(url, timeout=30.0)
        self.model = model
        self.iid = random.getrandbits(62)
        self.chunk_size = int(self.client.call("get_chunk_size"))
        self.bpc = self.chunk_size // BLOCK
        nb = 1 + chunks * self.bpc
        self.dims = (2, nb, HEADS, BLOCK, HEAD_SIZE)  # [K/V, block, head, slot, dim], HND
        self.nbytes = 2 * int(np.prod(self.dims))  # bfloat16
        self.names: list[str] = []
        self.maps: list[mmap.mmap] = []
        for _ in range(LAYERS):
            name = f"/lmcache_kv_{os.getpid()}_{next(_SEGMENTS)}"
            fd = shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            self.names.append(name)
            try:
                os.ftruncate(fd, self.nbytes)
                self.maps.append(mmap.mmap(fd, self.nbytes))
            finally:
                os.close(fd)
        rng = np.random.default_rng(os.getpid())
        for m in self.maps:
            m[:] = rng.integers(0, 256, self.nbytes, dtype=np.uint8).tobytes()

    def blocks(self, first: int, chunks: int) -> list[int]:
        a = 1 + first * self.bpc
        return list(range(a, a + chunks * self.bpc))

    def layer(self, i: int) -> np.ndarray:
        return np.frombuffer(self.maps[i], np.uint16).reshape(self.dims)

    def register(self) -> None:
        enc = msgspec.msgpack.Encoder()
        stride = [int(np.prod(self.dims[i + 1 :])) for i in range(len(self.dims))]
        descs = [
            msgspec.msgpack.Ext(
                1,
                enc.encode(
                    {
                        "type": "cpu_shm",
                        "shm_name": name,
                        "nbytes": self.nbytes,
                        "version": 1,
                        "metadata": {
                            "dtype": "bfloat16",
                            "shape": list(self.dims),
                            "stride": stride,
                            "storage_offset": 0,
                            "device_uuid": "cpu",
                        },
                    }
                ),
            )
            for name in self.names
        ]
        group = {
            "engine_group_id": 0,
            "layer_indices": list(range(LAYERS)),
            "tokens_per_block": BLOCK,
            "sw_size_tokens": -1,
            "extra_object_group_tag": 0,
            "recurrent_state": False,
        }
        self.client.call(
            "register_kv_cache",
            self.iid,
            descs,
            self.model,
            1,
            "vllm",
            {"kv_layout": "HND"},
            [group],
        )
        self.client.call("ping", self.iid)

    def key(self, seed: int, chunks: int, *, worker: int | None = 0, rid: str = "") -> t.CacheKey:
        rng = random.Random(seed)
        tokens = [rng.randrange(1, 50_000) for _ in range(chunks * self.chunk_size)]
        end = chunks * self.chunk_size
        return t.CacheKey(self.model, 1, worker, tokens, 0, end, rid or f"r{seed}", "", None, 1)

    def store(self, seed: int, first: int, chunks: int) -> bool:
        reply = self.client.call(
            "store", self.key(seed, chunks), self.iid, [self.blocks(first, chunks)], STUB_EVENT
        )
        return bool(reply[1])

    def retrieve(self, seed: int, first: int, chunks: int) -> tuple[bool, int]:
        rid = f"q{seed}-{random.getrandbits(30)}"
        self.client.call("lookup", self.key(seed, chunks, worker=None, rid=rid), 1)
        hit = None
        while hit is None:
            hit = self.client.call("query_prefetch_status", rid)
        reply = self.client.call(
            "retrieve",
            self.key(seed, chunks, rid=rid),
            self.iid,
            [self.blocks(first, chunks)],
            STUB_EVENT,
            0,
        )
        self.client.call("end_session", rid)
        return bool(reply[1]), int(hit)

    def equal(self, a: int, b: int, chunks: int) -> bool:
        ia, ib = np.asarray(self.blocks(a, chunks)), np.asarray(self.blocks(b, chunks))
        return all(
            np.array_equal(self.layer(i)[:, ia], self.layer(i)[:, ib]) for i in range(LAYERS)
        )

    def truncate(self, nbytes: int) -> None:
        for name in self.names:
            fd = shm_open(name, os.O_RDWR, mode=0o600)
            try:
                os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)

    def close(self) -> None:
        try:
            self.client.call("unregister_kv_cache", self.iid)
        finally:
            self.client.close()
            for name in self.names:
                shm_unlink(name)


def serve(args: argparse.Namespace) -> None:
    eng = Engine(args.url, args.chunks, args.model)
    eng.register()
    out = sys.stdout
    names = [n.lstrip("/") for n in eng.names]
    print(json.dumps({"ready": True, "pid": os.getpid(), "names": names, "instance_id": eng.iid}))
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            eng.close()
            return
        if op == "store":
            ans: dict[str, Any] = {"ok": eng.store(cmd["seed"], cmd["first"], cmd["chunks"])}
        elif op == "retrieve":
            ok, hit = eng.retrieve(cmd["seed"], cmd["first"], cmd["chunks"])
            ans = {"ok": ok, "hit": hit}
        elif op == "equal":
            ans = {"equal": eng.equal(cmd["a"], cmd["b"], cmd["chunks"])}
        elif op == "truncate":
            eng.truncate(cmd["nbytes"])
            ans = {"ok": True}
        elif op == "register":
            eng.register()
            ans = {"ok": True}
        elif op == "ping":
            eng.client.call("ping", eng.iid)
            ans = {"ok": True}
        else:
            ans = {"error": f"unknown op {op!r}"}
        print(json.dumps(ans))
        out.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--model", default="segtest")
    ap.add_argument("--ns-pid", type=int, default=0)
    args = ap.parse_args()
    if args.ns_pid:
        if os.getpid() != 1:
            sys.exit(f"--ns-pid needs to run as a PID namespace's init, not pid {os.getpid()}")
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(args.ns_pid - 1))
        argv = ["--url", args.url, "--chunks", str(args.chunks), "--model", args.model]
        sys.exit(subprocess.call([sys.executable, __file__, *argv]))
    serve(args)


if __name__ == "__main__":
    main()
