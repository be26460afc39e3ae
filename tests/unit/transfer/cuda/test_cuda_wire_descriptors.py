"""The CUDA IPC descriptor variants (``cuda``, ``cuda_raw``, ``cuda_vmm``) decoded by
:func:`kvhive.wire.types.descriptor_from_map`: as the real lmcache 0.5.6 client encodes
them (its own ``ipc_wire`` structs, run in the client venv), as hand-built maps following
protocol §4.3, and every malformed shape refused with ``msgspec.ValidationError`` (which
the codec reports as a ``ProtocolError`` error reply)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kvhive.wire import types as t
from support.venvs import locate_venv_python, unavailable

REPO = Path(__file__).resolve().parents[4]
META = {
    "dtype": "bfloat16",
    "shape": [2, 4, 16],
    "stride": [64, 16, 1],
    "storage_offset": 8,
    "device_uuid": "58d9b2e1-0000-1111-2222-333344445555",
}
MEM = bytes(range(66))  # torch's shareable handle: opaque, not necessarily 64 bytes
EVT = b"\x02" * 64


def cuda_map(**over: Any) -> dict[str, Any]:
    m = {
        "type": "cuda",
        "handle": [0, MEM, 4096, 512, b"/torch_1_2", 3, EVT, True],
        "version": 1,
        "metadata": dict(META),
    }
    m.update(over)
    return m


def raw_map(**over: Any) -> dict[str, Any]:
    m = {
        "type": "cuda_raw",
        "ipc_handle": b"\x03" * 64,
        "alloc_offset": 1024,
        "nbytes": 4096,
        "version": 1,
        "metadata": dict(META, storage_offset=0),
    }
    m.update(over)
    return m


def vmm_map(**over: Any) -> dict[str, Any]:
    m = {
        "type": "cuda_vmm",
        "export_id": b"\x04" * 16,
        "kind": "posix_fd",
        "fabric_blob": None,
        "alloc_size": 8192,
        "alloc_offset": 1024,
        "nbytes": 4096,
        "version": 1,
        "metadata": dict(META, storage_offset=0),
    }
    m.update(over)
    return m


def decode(m: dict[str, Any]) -> Any:
    """Through msgpack, as the ext payload arrives."""
    return t.descriptor_from_map(msgspec.msgpack.decode(msgspec.msgpack.encode(m)))


def test_cuda_handle_decodes_into_a_named_record() -> None:
    d = decode(cuda_map())
    assert isinstance(d, t.CudaDescriptor) and d.type == "cuda" and d.version == 1
    assert d.handle == t.CudaStorageHandle(0, MEM, 4096, 512, b"/torch_1_2", 3, EVT, True)
    assert d.handle.storage_size_bytes == 4096 and d.handle.storage_offset_bytes == 512
    assert d.handle.ref_counter_handle == b"/torch_1_2" and d.handle.event_sync_required
    assert d.metadata.shape == [2, 4, 16] and d.metadata.storage_offset == 8
    nil = decode(cuda_map(handle=[1, None, 0, 0, None, 0, None, False]))
    assert nil.handle.mem_handle is None and nil.handle.event_handle is None


def test_cuda_raw_and_vmm_decode() -> None:
    r = decode(raw_map())
    assert isinstance(r, t.CudaRawDescriptor)
    assert (r.ipc_handle, r.alloc_offset, r.nbytes) == (b"\x03" * 64, 1024, 4096)
    v = decode(vmm_map())
    assert isinstance(v, t.CudaVmmDescriptor) and v.kind == "posix_fd" and v.fabric_blob is None
    assert (v.export_id, v.alloc_size, v.alloc_offset, v.nbytes) == (b"\x04" * 16, 8192, 1024, 4096)
    f = decode(vmm_map(kind="fabric", fabric_blob=b"\x05" * 64))
    assert f.kind == "fabric" and f.fabric_blob == b"\x05" * 64
    edge = decode(vmm_map(alloc_offset=4096, nbytes=4096))  # ends exactly at the allocation
    assert edge.alloc_offset + edge.nbytes == edge.alloc_size


def test_other_variants_stay_other_and_cpu_shm_stays_typed() -> None:
    assert decode({"type": "musa", "version": 1, "handle": {}}) == t.OtherDescriptor("musa")
    assert decode({"type": "npu", "version": 1}) == t.OtherDescriptor("npu")
    shm = {
        "type": "cpu_shm",
        "shm_name": "/x",
        "nbytes": 12,
        "version": 1,
        "metadata": dict(META, dtype="float16", shape=[2, 3], stride=[3, 1], storage_offset=0),
    }
    assert isinstance(decode(shm), t.CpuShmDescriptor)


MALFORMED = [
    ("cuda handle of 7 elements", cuda_map(handle=[0, MEM, 4096, 512, b"r", 3, EVT])),
    ("cuda handle of 9 elements", cuda_map(handle=[0, MEM, 4096, 512, b"r", 3, EVT, True, 1])),
    ("cuda handle not an array", cuda_map(handle={"device": 0})),
    ("cuda negative size", cuda_map(handle=[0, MEM, -1, 0, b"r", 3, EVT, True])),
    ("cuda empty mem handle", cuda_map(handle=[0, b"", 4096, 0, b"r", 3, EVT, True])),
    ("cuda str mem handle", cuda_map(handle=[0, "x", 4096, 0, b"r", 3, EVT, True])),
    ("cuda unknown field", cuda_map(extra=1)),
    ("cuda version 2", cuda_map(version=2)),
    ("cuda no metadata", {k: v for k, v in cuda_map().items() if k != "metadata"}),
    ("cuda metadata unknown field", cuda_map(metadata=dict(META, extra=1))),
    ("raw handle 63 bytes", raw_map(ipc_handle=b"\x03" * 63)),
    ("raw handle 65 bytes", raw_map(ipc_handle=b"\x03" * 65)),
    ("raw negative offset", raw_map(alloc_offset=-8)),
    ("raw negative nbytes", raw_map(nbytes=-1)),
    ("raw missing nbytes", {k: v for k, v in raw_map().items() if k != "nbytes"}),
    ("raw unknown field", raw_map(alloc_size=9)),
    ("vmm export id 15 bytes", vmm_map(export_id=b"\x04" * 15)),
    ("vmm kind", vmm_map(kind="dma_buf")),
    ("vmm fabric without blob", vmm_map(kind="fabric")),
    ("vmm blob without fabric", vmm_map(fabric_blob=b"\x05" * 64)),
    ("vmm range past allocation", vmm_map(alloc_offset=4097)),
    ("vmm negative size", vmm_map(alloc_size=-1)),
    ("vmm missing fabric_blob", {k: v for k, v in vmm_map().items() if k != "fabric_blob"}),
    ("vmm version 0", vmm_map(version=0)),
]


@pytest.mark.parametrize(("why", "payload"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_cuda_descriptors_fail_the_decode(why: str, payload: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(payload)


_CLIENT_SCRIPT = """
import sys, msgspec
from lmcache.v1.platform.base import ipc_wire as w
m = w.TensorMetadata(dtype="bfloat16", shape=(2, 4, 16), stride=(64, 16, 1),
                     storage_offset=0, device_uuid="58d9b2e1-0000-1111-2222-333344445555")
out = [
    w.CudaIPCData(version=1, metadata=m,
                  handle=(1, bytes(range(66)), 4096, 512, b"/torch_9_1", 3, b"\\x02" * 64, True)),
    w.RawCudaIPCData(version=1, metadata=m, ipc_handle=b"\\x03" * 64, alloc_offset=1024,
                     nbytes=4096),
    w.VmmCudaIPCData(version=1, metadata=m, export_id=b"\\x04" * 16, kind="posix_fd",
                     fabric_blob=None, alloc_size=8192, alloc_offset=1024, nbytes=4096),
    w.VmmCudaIPCData(version=1, metadata=m, export_id=b"\\x06" * 16, kind="fabric",
                     fabric_blob=b"\\x05" * 64, alloc_size=8192, alloc_offset=0, nbytes=4096),
]
sys.stdout.write("\\n".join(msgspec.msgpack.encode(d).hex() for d in out))
"""


def test_payloads_encoded_by_the_real_lmcache_client() -> None:
    python, why = locate_venv_python(
        "KVHIVE_CLIENT_PYTHON", REPO / "scripts" / "setup_client_venv.sh", "lmcache client"
    )
    if python is None:
        unavailable(why)
    proc = subprocess.run(
        [python, "-c", _CLIENT_SCRIPT], capture_output=True, text=True, timeout=180, check=True
    )
    lines = proc.stdout.split()
    cuda, raw, vmm, fabric = (
        t.descriptor_from_map(msgspec.msgpack.decode(bytes.fromhex(x))) for x in lines
    )
    assert cuda == t.CudaDescriptor(
        version=1,
        metadata=t.TensorMetadata("bfloat16", [2, 4, 16], [64, 16, 1], 0, META["device_uuid"]),
        handle=t.CudaStorageHandle(1, bytes(range(66)), 4096, 512, b"/torch_9_1", 3, EVT, True),
    )
    assert isinstance(raw, t.CudaRawDescriptor) and raw.ipc_handle == b"\x03" * 64
    assert (raw.alloc_offset, raw.nbytes) == (1024, 4096)
    assert isinstance(vmm, t.CudaVmmDescriptor) and vmm.export_id == b"\x04" * 16
    assert (vmm.kind, vmm.fabric_blob, vmm.alloc_size) == ("posix_fd", None, 8192)
    assert fabric.kind == "fabric" and fabric.fabric_blob == b"\x05" * 64
