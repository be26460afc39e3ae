"""``cpu_shm`` IPC descriptors, encoded by hand the way the lmcache 0.5.6 CPU worker sends them
in ``register_kv_cache`` (one msgpack ext-type-1 wrapper per layer), and the typed
:class:`kvhive.wire.types.CpuShmDescriptor` kvhive decodes them into.

The payload is built from plain dicts, not from kvhive's types, so a test that feeds it to
kvhive's decoder checks the decoder against the wire format (``tests/unit/support`` checks that
:func:`cpu_shm_ext` and :func:`cpu_shm_descriptor` agree through that decoder).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from kvhive.wire import types as t

#: msgpack ext code of lmcache's IPC wrappers.
IPC_EXT_CODE = 1

#: Bytes per element of the dtypes the tests use (torch names).
ITEMSIZE = {
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
}

_ENC = msgspec.msgpack.Encoder()


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of ``shape``."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def span_nbytes(
    dtype: str, shape: Sequence[int], stride: Sequence[int], storage_offset: int = 0
) -> int:
    """Bytes from the segment start to just past the last element the view can reach."""
    if math.prod(shape) == 0:
        return storage_offset * ITEMSIZE[dtype]
    last = storage_offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    return (last + 1) * ITEMSIZE[dtype]


def cpu_shm_payload(
    shm_name: str,
    dtype: str,
    shape: Sequence[int],
    *,
    stride: Sequence[int] | None = None,
    storage_offset: int = 0,
    nbytes: int | None = None,
    device_uuid: str = "cpu",
    version: int = 1,
) -> dict[str, Any]:
    """The map inside one ``cpu_shm`` wrapper.  ``stride`` defaults to contiguous, ``nbytes``
    to the bytes the view spans (:func:`span_nbytes`)."""
    stride = list(contiguous_strides(shape) if stride is None else stride)
    if nbytes is None:
        nbytes = span_nbytes(dtype, shape, stride, storage_offset)
    return {
        "type": "cpu_shm",
        "shm_name": shm_name,
        "nbytes": nbytes,
        "version": version,
        "metadata": {
            "dtype": dtype,
            "shape": list(shape),
            "stride": stride,
            "storage_offset": storage_offset,
            "device_uuid": device_uuid,
        },
    }


def ipc_ext(payload: dict[str, Any]) -> msgspec.msgpack.Ext:
    """``payload`` (any IPC variant, valid or not) as the ext-type-1 value on the wire."""
    return msgspec.msgpack.Ext(IPC_EXT_CODE, _ENC.encode(payload))


def cpu_shm_ext(shm_name: str, dtype: str, shape: Sequence[int], **kw: Any) -> msgspec.msgpack.Ext:
    """:func:`cpu_shm_payload` wrapped by :func:`ipc_ext`: what ``register_kv_cache`` carries."""
    return ipc_ext(cpu_shm_payload(shm_name, dtype, shape, **kw))


def cpu_shm_descriptor(
    shm_name: str, dtype: str, shape: Sequence[int], **kw: Any
) -> t.CpuShmDescriptor:
    """The typed descriptor kvhive's wire decoder makes of :func:`cpu_shm_ext` with the same
    arguments (for calling the engine in-process)."""
    p = cpu_shm_payload(shm_name, dtype, shape, **kw)
    m = p["metadata"]
    return t.CpuShmDescriptor(
        version=p["version"],
        metadata=t.TensorMetadata(
            m["dtype"], m["shape"], m["stride"], m["storage_offset"], m["device_uuid"]
        ),
        shm_name=p["shm_name"],
        nbytes=p["nbytes"],
    )
