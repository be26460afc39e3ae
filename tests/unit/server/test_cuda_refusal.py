"""A CUDA registration against a real server whose torch has no CUDA (this machine): the
worker gets an error reply naming the extra to install, at once, and the server goes on
serving (a cpu_shm registration right after works)."""

from __future__ import annotations

import time

import pytest

from kvhive.client import KvhiveClient, RemoteError
from kvhive.transfer.cuda.runtime import CUDA_EXTRA
from support.descriptors import ipc_ext
from support.servers import running_server
from support.shm import shm_kv

META = {
    "dtype": "bfloat16",
    "shape": [2, 4, 16, 2, 8],
    "stride": [1024, 256, 16, 8, 1],
    "storage_offset": 0,
    "device_uuid": "58d9b2e1-0000-1111-2222-333344445555",
}
CUDA = {
    "type": "cuda",
    "version": 1,
    "metadata": META,
    "handle": [0, b"\x01" * 64, 4096, 0, b"/torch_1_1", 0, None, False],
}
CUDA_RAW = {
    "type": "cuda_raw",
    "version": 1,
    "metadata": META,
    "ipc_handle": b"\x02" * 64,
    "alloc_offset": 0,
    "nbytes": 4096,
}


@pytest.fixture(scope="module")
def server():
    with running_server() as srv:
        yield srv


@pytest.mark.parametrize("desc", [CUDA, CUDA_RAW], ids=["cuda", "cuda_raw"])
def test_cuda_registration_is_refused_naming_the_extra(server, desc):
    with KvhiveClient(server.zmq.endpoints[0], timeout=10) as client:
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as err:
            client.call(
                "register_kv_cache",
                21,
                [ipc_ext(desc)] * 2,
                "m",
                1,
                "vllm",
                {"kv_layout": "NHD"},
                [],
            )
        assert time.monotonic() - t0 < 5
        assert CUDA_EXTRA in str(err.value.detail), err.value.detail
        # the server still serves a CPU engine
        with shm_kv() as kv:
            client.call(
                "register_kv_cache",
                22,
                kv.wire_descriptors(),
                "m",
                1,
                "vllm",
                {"kv_layout": "HND"},
                [],
            )
            client.call("unregister_kv_cache", 22)
