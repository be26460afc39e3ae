"""Engine-driven pickle payloads (protocol §15.4): ``list[torch.Tensor]`` <-> bytes.

In engine-driven mode without a shared pool, a worker sends each store as
``pickle.dumps(list_of_chunk_tensors)`` and expects the same back from
``prepare_retrieve``.  What such a payload holds, per tensor::

    torch._utils._rebuild_tensor_v2(            # _v3 + dtype for fp8/uint16/...
        torch.storage._load_from_bytes(b"<legacy torch.save of the storage>"),
        storage_offset, size, stride, requires_grad, OrderedDict())

    legacy torch.save stream (all little-endian):
      pickle(magic) pickle(1001) pickle(sys_info)
      pickle(storage, with persistent id ("storage", torch.<T>Storage, key, "cpu", numel, None))
      pickle([key])  int64(numel)  numel * itemsize raw bytes

Unpickling is code execution, so decoding never runs ``pickle.loads`` on the
payload: a restricted unpickler resolves only the names above (mapped onto
our own validating rebuild functions) and parses the storage stream itself
instead of calling ``torch.load``.  Anything else is a BadRequest.

Encoding uses torch's own pickling (what the reference server does), so the
client can always read it.  torch is imported lazily; without it both
directions raise UnsupportedError.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import math
import pickle
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import numpy as np

from kvhive.errors import BadRequest, UnsupportedError
from kvhive.transfer.descriptors import DTYPE_ITEMSIZE, canonical_dtype, itemsize
from kvhive.transfer.shm import uint_dtype

_NEEDS_TORCH = "engine-driven pickle transfer needs torch: pip install 'kvhive[torch]'"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001

# Storage classes of the legacy stream -> element dtype (UntypedStorage is bytes).
_STORAGE_DTYPES = {
    "BFloat16Storage": "bfloat16",
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "ByteStorage": "uint8",
    "CharStorage": "int8",
    "ShortStorage": "int16",
    "IntStorage": "int32",
    "LongStorage": "int64",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


@cache
def torch_available() -> bool:
    """Whether torch is installed (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def _torch() -> Any:
    if not torch_available():
        raise UnsupportedError(_NEEDS_TORCH)
    try:
        import torch
    except ImportError:  # installed but broken
        raise UnsupportedError(_NEEDS_TORCH) from None
    return torch


@dataclass(frozen=True, slots=True)
class DecodedTensor:
    """One tensor of a payload: dtype name, logical shape and its bytes in C order."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, contiguous, prod(shape) * itemsize bytes


@dataclass(frozen=True, slots=True)
class _DType:
    name: str


@dataclass(frozen=True, slots=True)
class _Storage:
    dtype: str
    data: np.ndarray  # uint8


@dataclass(frozen=True, slots=True)
class _StorageRecord:  # only persistent_load makes these: a payload cannot forge one
    dtype: str
    key: str
    numel: int


def _bad(msg: str) -> BadRequest:
    return BadRequest(f"invalid tensor pickle: {msg}")


class _StorageUnpickler(pickle.Unpickler):
    """Reads the pickles inside a legacy storage stream."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _DType(_STORAGE_DTYPES[name])
        raise _bad(f"forbidden global {module}.{name} in storage stream")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise _bad("unexpected persistent id")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _DType) or not isinstance(key, str) or view is not None:
            raise _bad("unsupported storage record")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise _bad("bad storage size")
        return _StorageRecord(stype.name, key, numel)


def _load_storage(blob: Any) -> _Storage:
    """Parse ``torch.save(storage, _use_new_zipfile_serialization=False)`` bytes."""
    if not isinstance(blob, bytes):
        raise _bad("storage payload is not bytes")
    f = io.BytesIO(blob)
    try:
        if _StorageUnpickler(f).load() != _LEGACY_MAGIC:
            raise _bad("bad storage magic number")
        if _StorageUnpickler(f).load() != _LEGACY_PROTOCOL:
            raise _bad("unsupported storage protocol version")
        info = _StorageUnpickler(f).load()
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise _bad("storage is not little-endian")
        record = _StorageUnpickler(f).load()
        keys = _StorageUnpickler(f).load()
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted input: any parser failure is a BadRequest
        raise _bad(f"unreadable storage stream ({type(exc).__name__})") from None
    if not isinstance(record, _StorageRecord):
        raise _bad("storage stream does not hold one storage")
    dtype, key, numel = record.dtype, record.key, record.numel
    if keys != [key]:
        raise _bad("storage key list mismatch")
    size = DTYPE_ITEMSIZE[dtype]  # from our own table via find_class
    head = f.read(8)
    if len(head) != 8 or struct.unpack("<q", head)[0] != numel:
        raise _bad("storage element count mismatch")
    start = f.tell()
    if len(blob) - start < numel * size:
        raise _bad("truncated storage data")
    return _Storage(dtype, np.frombuffer(blob, np.uint8, numel * size, start))


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value
    ):
        raise _bad(f"bad {what}")
    return value


def _rebuild(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: str | None,
    metadata: Any = None,
) -> DecodedTensor:
    """Validate the rebuild arguments and copy the view out as C-order bytes."""
    if not isinstance(storage, _Storage):
        raise _bad("tensor without a storage")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _bad("bad storage offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise _bad("size and stride ranks differ")
    if not isinstance(requires_grad, bool) or not isinstance(hooks, dict) or hooks:
        raise _bad("unsupported autograd state")
    if metadata is not None and not isinstance(metadata, dict):
        raise _bad("bad tensor metadata")
    dtype = dtype or storage.dtype
    isz = DTYPE_ITEMSIZE[dtype]
    if storage.data.size % isz:
        raise _bad("storage size is not a whole number of elements")
    numel = math.prod(size)
    if numel * isz > storage.data.size:  # no broadcast views: bounds what we allocate
        raise _bad("tensor has more elements than its storage")
    elems = storage.data.view(uint_dtype(isz))
    if numel:
        end = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if end > elems.size:
            raise _bad("tensor view exceeds its storage")
        view = np.lib.stride_tricks.as_strided(
            elems[offset:], shape=size, strides=tuple(s * isz for s in stride), writeable=False
        )
        data = np.ascontiguousarray(view).reshape(-1).view(np.uint8)
    else:
        data = np.zeros(0, np.uint8)
    return DecodedTensor(dtype, size, data)


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> DecodedTensor:
    if len(rest) not in (2, 3):
        raise _bad("bad _rebuild_tensor_v2 arguments")
    return _rebuild(storage, offset, size, stride, rest[0], rest[1], None, *rest[2:])


def _rebuild_v3(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> DecodedTensor:
    if len(rest) not in (3, 4) or not isinstance(rest[2], _DType):
        raise _bad("bad _rebuild_tensor_v3 arguments")
    if not isinstance(storage, _Storage) or storage.dtype != "uint8":
        raise _bad("_rebuild_tensor_v3 needs an untyped storage")
    return _rebuild(storage, offset, size, stride, rest[0], rest[1], rest[2].name, *rest[3:])


def _size(*args: Any) -> tuple[int, ...]:
    return tuple(*args)  # torch.Size(...) -> plain tuple


class _PayloadUnpickler(pickle.Unpickler):
    """Resolves only what a pickled ``list[torch.Tensor]`` needs."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): _size,
    }

    def find_class(self, module: str, name: str) -> Any:
        fn = self._ALLOWED.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and name in DTYPE_ITEMSIZE:
            return _DType(name)
        raise _bad(f"forbidden global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _bad("unexpected persistent id")


def _decode(data: bytes) -> list[DecodedTensor]:
    try:
        obj = _PayloadUnpickler(io.BytesIO(data)).load()
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted input: any parser failure is a BadRequest
        raise _bad(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, list) or not all(isinstance(t, DecodedTensor) for t in obj):
        raise _bad("payload is not a list of tensors")
    return obj


def decode_tensor_list(data: bytes) -> list[DecodedTensor]:
    """Decode a store payload into dtype, shape and bytes per chunk tensor.

    Raises BadRequest for anything but a pickled list of dense CPU tensors,
    UnsupportedError without torch.  (Decoding never imports torch -- the
    parser is our own -- but a server that cannot answer retrieves in this
    mode should not accept its stores either.)
    """
    if not torch_available():
        raise UnsupportedError(_NEEDS_TORCH)
    return _decode(bytes(data))


def decode_tensors(data: bytes) -> list[np.ndarray]:
    """The chunk tensors of a store payload as contiguous ``uint8`` byte arrays."""
    return [t.data for t in decode_tensor_list(data)]


@cache
def _torch_roundtrips(dtype: str) -> bool:
    # torch 2.13 pickles fp8/uint16/... tensors it cannot unpickle again; an
    # unreadable payload would break the client, so we refuse to send one.
    torch = _torch()
    try:
        pickle.loads(pickle.dumps(torch.zeros(1, dtype=getattr(torch, dtype))))
    except (AttributeError, TypeError, RuntimeError, pickle.PickleError):
        return False
    return True


def encode_tensors(chunks: list[np.ndarray], shape: tuple[int, ...], dtype: str) -> bytes:
    """Pickle ``chunks`` (object bytes) as ``list[torch.Tensor]`` of ``shape``/``dtype``.

    Each chunk must hold exactly ``prod(shape) * itemsize(dtype)`` bytes.
    Raises UnsupportedError without torch, or for a dtype this torch cannot
    unpickle; ValueError for a chunk of the wrong size.
    """
    torch = _torch()
    dtype = canonical_dtype(dtype)
    if not _torch_roundtrips(dtype):
        raise UnsupportedError(
            f"torch {torch.__version__} cannot unpickle {dtype} tensors; "
            "use the shared-memory engine-driven mode"
        )
    shape = tuple(int(n) for n in shape)
    nbytes = math.prod(shape) * itemsize(dtype)
    tdtype = getattr(torch, dtype)
    tensors = []
    for i, chunk in enumerate(chunks):
        arr = np.asarray(chunk)
        if arr.dtype != np.uint8 or arr.size != nbytes:
            raise ValueError(f"chunk {i} has {arr.size} {arr.dtype} items, expected {nbytes} bytes")
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            arr = arr.copy()  # torch.from_numpy warns on read-only arrays
        tensors.append(torch.from_numpy(arr.reshape(-1)).view(tdtype).reshape(shape))
    return pickle.dumps(tensors, protocol=4)
