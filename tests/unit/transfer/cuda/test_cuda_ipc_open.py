"""kvhive.transfer.cuda.ipc_open: opening ``cuda``/``cuda_raw``/``cuda_vmm`` descriptors.

On CPU the device side is :class:`MockCudaRuntime` (named as a mock: no GPU here): "device
memory" is CPU tensors registered by the test as a worker's allocations, so the views,
labels, the per-handle reference counts across registrations, the releases on close and
after a failure mid-way are all checked for real.  The GPU test at the end shares tensors
from a spawned child process through each supported kind and checks bytes both ways.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np
import pytest
import torch

from kvhive.errors import RegistrationError
from kvhive.transfer.cuda import ipc_open as io
from kvhive.wire import types as t
from support.mock_cuda import U0, U1, MockCudaRuntime, cuda_desc, meta, raw_desc, vmm_desc

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def as_bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


H1, H2 = b"\x01" * 64, b"\x02" * 64


@pytest.fixture
def rt() -> MockCudaRuntime:
    return MockCudaRuntime()


@pytest.fixture
def table() -> io.RawMappingTable:
    return io.RawMappingTable()


# ---- cuda -------------------------------------------------------------------------------------


def test_cuda_views_are_rebuilt_on_the_ordinal_of_the_uuid(rt: MockCudaRuntime) -> None:
    mem = rt.allocation(b"M" * 66, 8192)
    # two K/V-style views of one storage (bytes 1024..5120), and one of another storage
    k = meta("float16", (4, 8), (16, 1), 0, U1)
    v = meta("float16", (4, 8), (16, 1), 8, U1)
    other = meta("float32", (8, 4), (1, 8), 2, U1)  # column-major, offset
    descs = [
        cuda_desc(b"M" * 66, 4096, 1024, k),
        cuda_desc(b"M" * 66, 4096, 1024, v),
        cuda_desc(b"M" * 66, 1024, 6144, other),
    ]
    with io.open_device_kv(descs, runtime=rt) as kv:
        assert kv.device == 1  # from U1, not the worker's index 5
        assert [o for o, _ in rt.storage_opens] == [1, 1, 1]
        a, b, c = kv.layers
        assert a.desc.shm_name == b.desc.shm_name == "cuda:1/0" and c.desc.shm_name == "cuda:1/1"
        assert a.desc.storage_kind == "device" and a.desc.nbytes == 4096 and c.desc.nbytes == 1024
        assert (b.tensor.shape, b.tensor.stride(), b.tensor.storage_offset()) == (
            (4, 8),
            (16, 1),
            8,
        )
        assert (c.tensor.shape, c.tensor.stride(), c.tensor.storage_offset()) == ((8, 4), (1, 8), 2)
        assert c.tensor.dtype == torch.float32 and b.desc.storage_offset == 8
        # element [i, j] of the V view is at byte 1024 + 2 * (8 + 16 i + j) of the allocation
        want = torch.stack([mem[1024 + 2 * (8 + 16 * i) :][:16] for i in range(4)])
        assert as_bytes(b.tensor) == as_bytes(want)
        b.tensor[3, 7] = 1.5  # writes reach the worker's memory
        off = 1024 + 2 * (8 + 16 * 3 + 7)
        assert mem[off : off + 2].view(torch.float16).item() == 1.5
        mem[6144 + 4 * (2 + 8 * 1 + 3) :][:4].view(torch.float32)[0] = 2.25  # and back
        assert c.tensor[3, 1].item() == 2.25
    assert kv.closed and kv.layers == ()


def test_cuda_view_past_its_storage_is_refused(rt: MockCudaRuntime) -> None:
    rt.allocation(b"M" * 66, 8192)
    too_far = meta("float16", (4, 8), (16, 1), 2000, U0)  # ends past the 4096-byte storage
    with pytest.raises(RegistrationError, match="ends at byte"):
        io.open_device_kv([cuda_desc(b"M" * 66, 4096, 0, too_far)], runtime=rt)
    assert rt.storage_opens == []  # checked before opening


def test_cuda_without_memory_handle_only_for_empty_views(rt: MockCudaRuntime) -> None:
    empty = t.CudaDescriptor(
        version=1,
        metadata=meta("bfloat16", (0, 8), (8, 1), 0),
        handle=t.CudaStorageHandle(0, None, 0, 0, None, 0, None, False),
    )
    kv = io.open_device_kv([empty], runtime=rt)
    assert kv.layers[0].tensor.shape == (0, 8) and kv.layers[0].desc.shm_name == ""
    kv.close()
    nonempty = t.CudaDescriptor(
        version=1,
        metadata=meta("bfloat16", (2, 8), (8, 1), 0),
        handle=t.CudaStorageHandle(0, None, 0, 0, None, 0, None, False),
    )
    with pytest.raises(RegistrationError, match="without a memory handle"):
        io.open_device_kv([nonempty], runtime=rt)


def test_layers_on_two_devices_unknown_uuid_and_foreign_kinds_are_refused(
    rt: MockCudaRuntime,
) -> None:
    rt.allocation(b"M" * 66, 8192)
    m0, m1 = meta("uint8", (16,), (1,), 0, U0), meta("uint8", (16,), (1,), 0, U1)
    with pytest.raises(RegistrationError, match="share one device"):
        io.open_device_kv(
            [cuda_desc(b"M" * 66, 64, 0, m0), cuda_desc(b"M" * 66, 64, 0, m1)], runtime=rt
        )
    with pytest.raises(RegistrationError, match="not visible"):
        io.open_device_kv(
            [cuda_desc(b"M" * 66, 64, 0, meta("uint8", (16,), (1,), 0, "nope"))], runtime=rt
        )
    shm = t.CpuShmDescriptor(version=1, metadata=m0, shm_name="/x", nbytes=16)
    with pytest.raises(RegistrationError, match="'cpu_shm' is not a CUDA IPC descriptor"):
        io.open_device_kv([shm], runtime=rt)  # type: ignore[list-item]
    with pytest.raises(RegistrationError, match="at least one"):
        io.open_device_kv([], runtime=rt)


# ---- cuda_raw ---------------------------------------------------------------------------------


def test_cuda_raw_views_share_one_mapping_per_handle(
    rt: MockCudaRuntime, table: io.RawMappingTable
) -> None:
    mem = rt.allocation(H1, 16384)
    k = raw_desc(H1, 2048, 4096, meta("bfloat16", (2, 1024), (1024, 1), 0))
    v = raw_desc(H1, 6144, 4096, meta("bfloat16", (2, 1024), (1024, 1), 0))
    kv = io.open_device_kv([k, v], runtime=rt, table=table)
    assert rt.ipc_opens == [H1] and table.refs(H1) == 1  # one reference per registration
    a, b = kv.layers
    assert a.desc.shm_name == b.desc.shm_name == "cuda:0/0"
    assert a.desc.nbytes == b.desc.nbytes == 10240  # furthest declared byte of the handle
    assert (a.desc.storage_offset, b.desc.storage_offset) == (1024, 3072)  # alloc_offset / 2
    assert b.tensor.storage_offset() == 3072 and b.tensor.stride() == (1024, 1)
    assert as_bytes(b.tensor) == as_bytes(mem[6144:10240])
    b.tensor[1, 1023] = 3.0
    assert mem[10238:10240].view(torch.bfloat16).item() == 3.0
    kv.close()
    assert table.refs(H1) == 0 and len(rt.ipc_closes) == 1 and rt.mapped == {}


def test_cuda_raw_refcount_spans_registrations(
    rt: MockCudaRuntime, table: io.RawMappingTable
) -> None:
    rt.allocation(H1, 8192)
    d = raw_desc(H1, 0, 4096, meta("uint8", (4096,), (1,), 0))
    first = io.open_device_kv([d], runtime=rt, table=table)
    second = io.open_device_kv([d], runtime=rt, table=table)
    assert rt.ipc_opens == [H1] and table.refs(H1) == 2
    first.close()
    first.close()  # idempotent: does not drop the second registration's reference
    assert table.refs(H1) == 1 and rt.ipc_closes == []
    assert int(second.layers[0].tensor[5]) == 5  # still mapped
    second.close()
    assert table.refs(H1) == 0 and len(rt.ipc_closes) == 1
    third = io.open_device_kv([d], runtime=rt, table=table)  # reopened afresh
    assert rt.ipc_opens == [H1, H1]
    third.close()


def test_cuda_raw_range_checks(rt: MockCudaRuntime, table: io.RawMappingTable) -> None:
    rt.allocation(H1, 8192)
    over = raw_desc(H1, 0, 100, meta("float16", (51,), (1,), 0))  # 102 bytes > nbytes 100
    with pytest.raises(RegistrationError, match="ends at byte 102"):
        io.open_device_kv([over], runtime=rt, table=table)
    odd = raw_desc(H1, 3, 64, meta("float16", (32,), (1,), 0))
    with pytest.raises(RegistrationError, match="not a multiple"):
        io.open_device_kv([odd], runtime=rt, table=table)
    assert rt.ipc_opens == [] and table.refs(H1) == 0


def test_failure_mid_way_releases_what_was_opened(
    rt: MockCudaRuntime, table: io.RawMappingTable
) -> None:
    rt.allocation(H1, 4096)
    rt.allocation(H2, 4096)
    rt.fail_open.add(H2)
    good = raw_desc(H1, 0, 4096, meta("uint8", (4096,), (1,), 0))
    bad = raw_desc(H2, 0, 4096, meta("uint8", (4096,), (1,), 0))
    with pytest.raises(RegistrationError, match="mock failure"):
        io.open_device_kv([good, bad], runtime=rt, table=table)
    assert table.refs(H1) == 0 and len(rt.ipc_closes) == 1 and rt.mapped == {}
    rt.fail_open.clear()
    rt.fail_wrap = True  # the open succeeds, wrapping it fails: still released
    with pytest.raises(RegistrationError, match="wrapping failed"):
        io.open_device_kv([good], runtime=rt, table=table)
    assert table.refs(H1) == 0 and len(rt.ipc_closes) == 2 and rt.mapped == {}


def test_close_keeps_releasing_after_one_release_fails(
    rt: MockCudaRuntime, table: io.RawMappingTable, caplog: pytest.LogCaptureFixture
) -> None:
    rt.allocation(H1, 4096)
    rt.allocation(H2, 4096)
    kv = io.open_device_kv(
        [
            raw_desc(H1, 0, 4096, meta("uint8", (4096,), (1,), 0)),
            raw_desc(H2, 0, 4096, meta("uint8", (4096,), (1,), 0)),
        ],
        runtime=rt,
        table=table,
    )
    rt.fail_close_once = True
    kv.close()
    assert len(rt.ipc_closes) == 2 and table.refs(H1) == table.refs(H2) == 0
    assert "releasing a CUDA IPC resource failed" in caplog.text


# ---- cuda_vmm ---------------------------------------------------------------------------------


def test_cuda_vmm_without_its_fd_is_refused_with_the_reason(rt: MockCudaRuntime) -> None:
    d = vmm_desc(b"E" * 16, 8192, 0, 4096, meta("uint8", (4096,), (1,), 0))
    with pytest.raises(RegistrationError, match=r"0\.5\.6") as e:
        io.open_device_kv([d], runtime=rt)
    assert "use_vmm_api" in str(e.value) and "SCM_RIGHTS" in str(e.value)
    fab = vmm_desc(
        b"E" * 16,
        8192,
        0,
        4096,
        meta("uint8", (4096,), (1,), 0),
        kind="fabric",
        fabric_blob=b"\x00" * 64,
    )
    with pytest.raises(RegistrationError, match="fabric"):
        io.open_device_kv([fab], runtime=rt)
    assert rt.vmm_imports == []


def test_cuda_vmm_with_delivered_fd_maps_once_and_releases(rt: MockCudaRuntime) -> None:
    r, w = os.pipe()  # any open fd stands in for the exported allocation's fd
    arr = np.zeros(8192, np.uint8)
    rt.vmm_by_fd[r] = arr
    mem = torch.from_numpy(arr)
    eid = b"E" * 16
    descs = [
        vmm_desc(eid, 8192, 0, 4096, meta("int32", (1024,), (1,), 0)),
        vmm_desc(eid, 8192, 4096, 4096, meta("int32", (32, 32), (1, 32), 0)),
    ]
    try:
        kv = io.open_device_kv(descs, fds=[io.VmmFd(eid, r)], runtime=rt)
        with pytest.raises(OSError):
            os.fstat(r)  # ownership taken: closed once imported
        assert rt.vmm_imports == [r]  # one import for both views
        a, b = kv.layers
        assert a.desc.shm_name == b.desc.shm_name and a.desc.nbytes == 8192
        assert b.desc.storage_offset == 1024 and b.tensor.stride() == (1, 32)
        b.tensor[2, 1] = -7  # element offset 1024 + 2 + 32
        assert mem[4 * (1024 + 34) :][:4].view(torch.int32).item() == -7
        kv.close()
        assert rt.vmm_releases == [r] and rt.mapped == {}
    finally:
        os.close(w)


def test_fds_are_closed_even_when_opening_fails(rt: MockCudaRuntime) -> None:
    r, w = os.pipe()
    rt.vmm_by_fd[r] = np.zeros(8192, np.uint8)
    bad = vmm_desc(b"E" * 16, 8192, 0, 4096, meta("uint8", (4096,), (1,), 0, "nope"))
    try:
        with pytest.raises(RegistrationError, match="not visible"):
            io.open_device_kv([bad], fds=[io.VmmFd(b"E" * 16, r)], runtime=rt)
        with pytest.raises(OSError):
            os.fstat(r)
    finally:
        os.close(w)


def test_vmm_allocation_declared_with_two_sizes_is_refused(rt: MockCudaRuntime) -> None:
    m = meta("uint8", (16,), (1,), 0)
    descs = [vmm_desc(b"E" * 16, 8192, 0, 16, m), vmm_desc(b"E" * 16, 4096, 0, 16, m)]
    with pytest.raises(RegistrationError, match="sizes 8192 and 4096"):
        io.open_device_kv(descs, runtime=rt)


# ---- a real GPU -------------------------------------------------------------------------------


def _cuda_ptr_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the allocation holding ``ptr`` (driver cuMemGetAddressRange)."""
    drv = ctypes.CDLL("libcuda.so.1")
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    err = drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    assert err == 0, f"cuMemGetAddressRange: {err}"
    return base.value, size.value


RAW_BYTES = 16 << 20  # over the caching allocator's 10 MiB: a cudaMalloc segment of its own


def _pattern(n: int, device: str) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int32, device=device) % 251).to(torch.uint8)


def gpu_producer(queue: Any, wrote: Any, back: Any, closed: Any) -> None:
    """Spawned child: a worker sharing one KV tensor through ``cuda`` (torch's storage
    sharing) and another through ``cuda_raw`` (a driver IPC handle of its allocation);
    it checks the server's writes and answers with writes of its own, and keeps both
    tensors alive until the server has closed them."""
    from kvhive.transfer.cuda.runtime import load_cudart

    uuid = str(torch.cuda.get_device_properties(0).uuid)
    kv = torch.arange(2 * 64 * 8, dtype=torch.float16, device="cuda:0").reshape(2, 64, 8)
    view = kv.permute(1, 0, 2)  # non-contiguous
    m = {
        "dtype": "float16",
        "shape": list(view.shape),
        "stride": list(view.stride()),
        "storage_offset": 0,
        "device_uuid": uuid,
    }
    big = _pattern(RAW_BYTES, "cuda:0")
    base, _size = _cuda_ptr_range(big.data_ptr())
    cudart = load_cudart(torch)
    handle = (ctypes.c_char * 64)()
    assert cudart.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(base)) == 0
    raw_meta = dict(m, dtype="int16", shape=[4096, 2048], stride=[2048, 1])
    queue.put(
        {
            "cuda": {"meta": m, "handle": list(kv.untyped_storage()._share_cuda_())},
            "raw": {
                "meta": raw_meta,
                "ipc_handle": bytes(handle),
                "alloc_offset": big.data_ptr() - base,
                "nbytes": RAW_BYTES,
            },
        }
    )
    assert wrote.wait(120)
    torch.cuda.synchronize()
    ok = view[5, 1, 3].item() == -1.0 and big[2 * (7 * 2048 + 9)].item() == 0xAB
    kv[0, 0, 0] = 42.0
    big[1] = 0xCD
    torch.cuda.synchronize()
    back.put(bool(ok))
    assert closed.wait(120)


@needs_gpu
def test_gpu_share_from_a_child_both_ways() -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, back = ctx.Queue(), ctx.Queue()
    wrote, closed = ctx.Event(), ctx.Event()
    child = ctx.Process(target=gpu_producer, args=(queue, wrote, back, closed))
    child.start()
    try:
        got = queue.get(timeout=120)
        cm = t.TensorMetadata(**got["cuda"]["meta"])
        handle = t.CudaStorageHandle(*got["cuda"]["handle"])
        cuda = t.CudaDescriptor(version=1, metadata=cm, handle=handle)
        r = got["raw"]
        raw = t.CudaRawDescriptor(
            version=1,
            metadata=t.TensorMetadata(**r["meta"]),
            ipc_handle=r["ipc_handle"],
            alloc_offset=r["alloc_offset"],
            nbytes=r["nbytes"],
        )
        with io.open_device_kv([cuda]) as kv_cuda, io.open_device_kv([raw]) as kv_raw:
            assert io.RAW_MAPPINGS.refs(r["ipc_handle"]) == 1
            v, f = kv_cuda.layers[0].tensor, kv_raw.layers[0].tensor
            assert v.is_cuda and v.shape == (64, 2, 8) and v.stride() == tuple(cm.stride)
            want = torch.arange(2 * 64 * 8, dtype=torch.float16).reshape(2, 64, 8)
            assert torch.equal(v.cpu(), want.permute(1, 0, 2))
            assert f.dtype == torch.int16 and f.shape == (4096, 2048)
            assert torch.equal(f.cpu().view(torch.uint8).reshape(-1), _pattern(RAW_BYTES, "cpu"))
            v[5, 1, 3] = -1.0
            f[7, 9] = 0xAB  # little-endian: the low byte is at the element's first byte
            torch.cuda.synchronize()
            wrote.set()
            assert back.get(timeout=120) is True
            assert v[0, 0, 0].item() == 42.0
            assert f.view(torch.uint8).reshape(-1)[1].item() == 0xCD
        assert io.RAW_MAPPINGS.refs(r["ipc_handle"]) == 0
        closed.set()
        child.join(60)
        assert child.exitcode == 0
    finally:
        closed.set()
        if child.is_alive():
            child.kill()


class _AllocProp(ctypes.Structure):
    """``CUmemAllocationProp`` (pinned device memory, exportable as a POSIX fd)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location_type", ctypes.c_int),
        ("location_id", ctypes.c_int),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", ctypes.c_uint8 * 8),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [
        ("location_type", ctypes.c_int),
        ("location_id", ctypes.c_int),
        ("flags", ctypes.c_int),
    ]


def vmm_producer(sock: Any, wrote: Any, back: Any, closed: Any) -> None:
    """Spawned child: a worker with a VMM allocation (``cuMemCreate``, POSIX-fd
    exportable) that hands the fd over a Unix socket (SCM_RIGHTS), then checks the
    server's write and answers with one of its own."""
    import socket

    torch.zeros(1, device="cuda:0")  # the primary context, current on this thread
    drv = ctypes.CDLL("libcuda.so.1")
    u64 = ctypes.c_uint64
    prop = _AllocProp(type=1, requestedHandleTypes=1, location_type=1, location_id=0)
    gran = ctypes.c_size_t()
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0) == 0
    size = max(gran.value, 2 << 20)
    handle, ptr = u64(), u64()
    assert (
        drv.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(prop), u64(0))
        == 0
    )
    assert (
        drv.cuMemAddressReserve(
            ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0), u64(0), u64(0)
        )
        == 0
    )
    assert drv.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle, u64(0)) == 0
    access = _AccessDesc(1, 0, 3)
    assert (
        drv.cuMemSetAccess(ptr, ctypes.c_size_t(size), ctypes.byref(access), ctypes.c_size_t(1))
        == 0
    )
    fd = ctypes.c_int(-1)
    assert drv.cuMemExportToShareableHandle(ctypes.byref(fd), handle, 1, u64(0)) == 0
    from kvhive.transfer.cuda.runtime import TorchCudaRuntime

    mem = TorchCudaRuntime(torch).wrap_pointer(0, ptr.value, size)
    mem.copy_(_pattern(size, "cuda:0"))
    torch.cuda.synchronize()
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    sock.sendall(size.to_bytes(8, "little") + uuid.encode().ljust(64))
    socket.send_fds(sock, [b"fd"], [fd.value])
    os.close(fd.value)
    assert wrote.wait(120)
    torch.cuda.synchronize()
    ok = mem[4096 + 2 * 10].item() == 0x5A
    mem[4096] = 0xA5
    torch.cuda.synchronize()
    back.put(bool(ok))
    assert closed.wait(120)
    del mem
    drv.cuMemUnmap(ptr, ctypes.c_size_t(size))
    drv.cuMemAddressFree(ptr, ctypes.c_size_t(size))
    drv.cuMemRelease(handle)


@needs_gpu
def test_gpu_vmm_fd_delivered_over_scm_rights_both_ways() -> None:
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    back, wrote, closed = ctx.Queue(), ctx.Event(), ctx.Event()
    child = ctx.Process(target=vmm_producer, args=(theirs, wrote, back, closed))
    child.start()
    theirs.close()
    try:
        ours.settimeout(120)
        head = b""
        while len(head) < 72:
            head += ours.recv(72 - len(head))
        size, uuid = int.from_bytes(head[:8], "little"), head[8:].decode().strip()
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        eid = b"V" * 16
        m = t.TensorMetadata("int16", [8, 1024], [1, 8], 0, uuid)  # column-major view
        d = t.CudaVmmDescriptor(
            version=1,
            metadata=m,
            export_id=eid,
            kind="posix_fd",
            fabric_blob=None,
            alloc_size=size,
            alloc_offset=4096,
            nbytes=8 * 1024 * 2,
        )
        with io.open_device_kv([d], fds=[io.VmmFd(eid, fds[0])]) as kv:
            v = kv.layers[0].tensor
            assert v.is_cuda and v.stride() == (1, 8) and v.storage_offset() == 2048
            want = _pattern(size, "cpu")[4096 : 4096 + 16384].view(torch.int16)
            assert torch.equal(v.cpu(), want.as_strided((8, 1024), (1, 8)))
            v[2, 1] = 0x5A  # element 2 + 8 = 10: bytes 4096 + 20 (low byte first)
            torch.cuda.synchronize()
            wrote.set()
            assert back.get(timeout=120) is True
            assert (v[0, 0].item() & 0xFF) == 0xA5
        closed.set()
        child.join(60)
        assert child.exitcode == 0
    finally:
        closed.set()
        ours.close()
        if child.is_alive():
            child.kill()
