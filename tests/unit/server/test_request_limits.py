"""Malformed and oversized requests all get a fast error reply (issue 10, fault 5).

Deeply nested msgpack (in the op frame, or in an argument of an inline, a CPU-pool and an
affinity op), a 50 MB ``ping`` and a 10,000-layer registration, against a real server.
Before the fix a nesting bomb's ``RecursionError`` escaped the decode guards and the
request was never answered (these tests then fail on the client's timeout); a 50 MB ping
was decoded on the loop thread and stalled every client; the registration held a transfer
thread for seconds.
"""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from kvhive.client import KvhiveClient, RemoteError
from kvhive.client.sync import RawFrame
from kvhive.wire.ops import MAX_REGISTRATION_LAYERS
from support.descriptors import ipc_ext
from support.servers import running_server
from support.shm import KVGeometry, shm_kv

enc = msgspec.msgpack.encode
FAST_S = 1.0  # an error reply arrives within this (the client's timeout is longer)
DEPTH = 3000  # well past the interpreter's recursion limit


def nested(depth: int = DEPTH) -> bytes:
    """A msgpack value of ``depth`` one-element arrays around a 1."""
    return b"\x91" * depth + b"\x01"


def key_frame(request_configs: bytes, tokens: int = 16) -> RawFrame:
    """A lookup/store key (``IPCCacheServerKey`` map) whose ``request_configs`` is the raw
    msgpack ``request_configs`` (a map ``{"x": <nested>}`` here)."""
    fields = {
        "model_name": "m",
        "world_size": 1,
        "worker_id": 0,
        "token_ids": list(range(tokens)),
        "start": 0,
        "end": tokens,
        "request_id": "r",
        "cache_salt": "",
        "num_kv_readers": 1,
    }
    body = enc(fields)[1:]  # a fixmap: drop its header, add one entry
    return RawFrame(
        bytes([0x80 | (len(fields) + 1)])
        + body
        + enc("request_configs")
        + b"\x81"
        + enc("x")
        + request_configs
    )


@pytest.fixture(scope="module")
def server():
    with running_server() as srv:
        yield srv


@pytest.fixture
def client(server):
    with KvhiveClient(server.zmq.endpoints[0], timeout=10) as c:
        yield c


def refused(client, op: str, *args, match: str = "") -> RemoteError:
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        client.call(op, *args)
    assert time.monotonic() - t0 < FAST_S
    assert match in str(err.value.detail), err.value.detail
    return err.value


def test_nested_op_frame_gets_an_error_reply(server):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(server.zmq.endpoints[0])
    try:
        for i, op in enumerate([nested(), nested(40), b"\x81" + nested(DEPTH) + b"\x01"]):
            s.send_multipart([enc(i), op])
            assert s.poll(FAST_S * 1000), f"no reply to nested op frame {i}"
            uid, op_reply, payload = s.recv_multipart()
            assert uid == enc(i)
            assert msgspec.msgpack.decode(op_reply).startswith("error")
            assert msgspec.msgpack.decode(payload)["code"] in ("too_large", "protocol")
    finally:
        s.close(0)


def test_nested_argument_of_an_inline_op(client):
    refused(client, "ping", RawFrame(nested()), match="bytes of arguments")
    refused(client, "query_prefetch_status", RawFrame(nested(1000)), match="argument 1")
    # a small lookup runs inline on the loop thread: its key nests past the recursion limit
    refused(client, "lookup", key_frame(nested()), 1, match="nested too deeply")
    assert client.call("noop") == "OK"


def test_nested_argument_of_a_cpu_pool_op(client):
    refused(client, "free_lookup_locks", key_frame(nested()), 1, match="nested too deeply")
    big = key_frame(nested(), tokens=8000)  # past the inline size: runs on the CPU pool
    refused(client, "lookup", big, 1, match="nested too deeply")
    refused(client, "clear", RawFrame(nested()), match="bytes of arguments")
    assert client.call("noop") == "OK"


def test_nested_argument_of_an_affinity_op(client):
    refused(client, "store", key_frame(nested()), 1, [[1]], b"", match="nested too deeply")
    hints = RawFrame(b"\x81" + enc("kv_layout") + nested())
    refused(
        client, "register_kv_cache", 5, [], "m", 1, "vllm", hints, [], match="nested too deeply"
    )
    assert client.call("noop") == "OK"


def test_50_mb_ping_is_refused_without_stalling_other_clients(server, client):
    url = server.zmq.endpoints[0]
    latencies: list[float] = []
    stop = threading.Event()

    def pinger() -> None:
        with KvhiveClient(url, timeout=5) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.call("ping", None)
                except TimeoutError:
                    latencies.append(float("inf"))
                    return
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.001)

    n = 50 * 1024 * 1024
    huge = RawFrame(b"\xdd" + n.to_bytes(4, "big") + b"\x01" * n)  # 50 M one-byte ints
    th = threading.Thread(target=pinger, daemon=True)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        client.call("ping", huge)
    refused_in = time.monotonic() - t0
    time.sleep(0.2)
    stop.set()
    th.join(10)
    # before the fix the loop thread decoded the 50 MB and every client waited for it
    assert latencies and max(latencies) < 0.25, max(latencies)
    assert refused_in < 2.0, refused_in  # the 50 MB travel over loopback included
    assert err.value.detail["code"] == "too_large", err.value.detail
    assert client.call("ping", None) is True


def test_oversized_registration_is_refused_fast(client):
    with shm_kv(geometry=KVGeometry(layers=1)) as kv:
        desc = kv.wire_descriptors()[0]
        layers = 10_000
        t0 = time.monotonic()
        err = refused(
            client,
            "register_kv_cache",
            9,
            [desc] * layers,
            "m",
            1,
            "vllm",
            {"kv_layout": "HND"},
            [],
            match=f"{layers} KV cache layers",
        )
        assert f"at most {MAX_REGISTRATION_LAYERS}" in str(err.detail)
        assert err.detail["code"] == "too_large"
        assert time.monotonic() - t0 < 0.5
        group = {"engine_group_id": 0, "layer_indices": list(range(layers))}
        refused(
            client,
            "register_kv_cache",
            9,
            [desc],
            "m",
            1,
            "vllm",
            {"kv_layout": "HND"},
            [group],
            match=f"lists {layers} layers",
        )
        # at the limit the request is decoded and reaches the engine, which judges the
        # descriptors themselves (musa ones are refused there, for their type)
        musa = ipc_ext({"type": "musa", "version": 1})
        err = refused(
            client,
            "register_kv_cache",
            9,
            [musa] * MAX_REGISTRATION_LAYERS,
            "m",
            1,
            "vllm",
            {"kv_layout": "HND"},
            [],
        )
        assert err.detail["code"] == "registration", err.detail
