"""Wire-independent description of one engine KV tensor view.

A :class:`TensorDesc` is what a worker tells us about one per-layer KV tensor
(the ``cpu_shm`` IPC wrapper of protocol §4.3, minus the wire details): the
dtype, the logical shape, strides and offset in **elements**, and the POSIX
shared-memory segment that backs it.  Sibling views of one engine storage
share a segment and differ in ``storage_offset``::

    segment "lmcache_kv_<pid>_<n>"  (nbytes bytes)
    +--------------------+--------------------+-----
    | layer 0 view       | layer 1 view       | ...
    +--------------------+--------------------+-----
    ^ offset 0           ^ storage_offset * itemsize

Nothing here maps memory; see :mod:`kvhive.transfer.shm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from kvhive.errors import RegistrationError

# Element size in bytes per torch dtype name (no "torch." prefix).  The
# server only moves bytes, so the size is all it needs to know about a dtype.
_ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "bits8": 1,
    "float16": 2,
    "bfloat16": 2,
    "int16": 2,
    "uint16": 2,
    "bits16": 2,
    "float32": 4,
    "int32": 4,
    "uint32": 4,
    "complex32": 4,
    "float64": 8,
    "int64": 8,
    "uint64": 8,
    "complex64": 8,
    "complex128": 16,
}

DTYPE_ITEMSIZE: Mapping[str, int] = MappingProxyType(_ITEMSIZE)
"""Bytes per element of every torch dtype name kvhive knows (read-only)."""

# torch also answers to these aliases (getattr(torch, "half") is float16).
_ALIASES: dict[str, str] = {
    "half": "float16",
    "float": "float32",
    "double": "float64",
    "short": "int16",
    "int": "int32",
    "long": "int64",
    "chalf": "complex32",
    "cfloat": "complex64",
    "cdouble": "complex128",
}

MAX_RANK = 16  # far beyond any KV layout; bounds the work a bad descriptor can cause
_NAME_MAX = 255  # NAME_MAX of /dev/shm entries


def canonical_dtype(name: str) -> str:
    """Return the canonical torch dtype name for ``name`` (``"half"`` -> ``"float16"``).

    Raises RegistrationError for a name that is not a known torch dtype.
    """
    if not isinstance(name, str):
        raise RegistrationError(f"dtype must be a string, got {type(name).__name__}")
    bare = name.removeprefix("torch.")
    bare = _ALIASES.get(bare, bare)
    if bare not in _ITEMSIZE:
        raise RegistrationError(f"unknown dtype {name!r}")
    return bare


def itemsize(dtype: str) -> int:
    """Bytes per element of the torch dtype ``dtype``; RegistrationError if unknown."""
    return _ITEMSIZE[canonical_dtype(dtype)]


def validate_shm_name(name: str) -> str:
    """Return the bare segment name (leading ``/`` removed) or raise RegistrationError.

    The name becomes a path under ``/dev/shm``, so anything that could escape
    that directory is refused.
    """
    if not isinstance(name, str):
        raise RegistrationError(f"shm_name must be a string, got {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    if not bare:
        raise RegistrationError("shm_name is empty")
    if "/" in bare or "\x00" in bare or bare in (".", ".."):
        raise RegistrationError(f"invalid shm_name {name!r}")
    if len(bare.encode()) > _NAME_MAX:
        raise RegistrationError(f"shm_name longer than {_NAME_MAX} bytes")
    return bare


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise RegistrationError(f"{what} must be a sequence of integers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RegistrationError(f"{what} must contain integers, got {v!r}")
        if v < 0:
            raise RegistrationError(f"{what} must be non-negative, got {v}")
        out.append(int(v))
    return tuple(out)


def _nonneg_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RegistrationError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


@dataclass(frozen=True, slots=True)
class TensorDesc:
    """One strided tensor view inside a POSIX shared-memory segment.

    Attributes:
        dtype: torch dtype name without prefix (``"bfloat16"``, ``"float8_e4m3fn"``).
        shape: logical shape.
        stride: strides in elements, same rank as ``shape``.
        storage_offset: offset of element ``[0, ..., 0]`` in elements.
        shm_name: segment name without the leading ``/``; ``""`` only for empty views.
            For a device tensor (``storage_kind="device"``) a label of the opened storage
            (``"cuda:<ordinal>/<n>"``), never a file name and never validated as one.
        nbytes: byte length of the segment (the mapping length), or of the device storage.
        storage_kind: ``"cpu_shm"`` (a POSIX segment the server maps) or ``"device"`` (a
            device allocation opened through CUDA IPC, see :mod:`kvhive.transfer.cuda`).

    Construction validates everything and raises RegistrationError, so a
    ``TensorDesc`` that exists is always safe to map.
    """

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    shm_name: str
    nbytes: int
    storage_kind: Literal["cpu_shm", "device"] = "cpu_shm"

    def __post_init__(self) -> None:
        # Normalise in place (frozen: go through object.__setattr__).
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        shape = _int_tuple(self.shape, "shape")
        stride = _int_tuple(self.stride, "stride")
        if len(shape) != len(stride):
            raise RegistrationError(f"shape has rank {len(shape)} but stride has {len(stride)}")
        if len(shape) > MAX_RANK:
            raise RegistrationError(f"rank {len(shape)} exceeds {MAX_RANK}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(
            self, "storage_offset", _nonneg_int(self.storage_offset, "storage_offset")
        )
        object.__setattr__(self, "nbytes", _nonneg_int(self.nbytes, "nbytes"))
        if self.numel == 0 and self.shm_name == "":
            return  # empty views carry no segment
        if self.storage_kind == "cpu_shm":
            object.__setattr__(self, "shm_name", validate_shm_name(self.shm_name))
        elif self.storage_kind != "device":
            raise RegistrationError(f"unknown storage kind {self.storage_kind!r}")
        span = self.byte_span()
        if span > self.nbytes:
            raise RegistrationError(
                f"view of {self.shm_name!r} ends at byte {span} but the segment has "
                f"{self.nbytes} bytes"
            )

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return _ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        """Number of elements of the view."""
        return math.prod(self.shape)

    @property
    def view_nbytes(self) -> int:
        """Bytes of the view's elements (``numel * itemsize``), not its span."""
        return self.numel * self.itemsize

    def byte_span(self) -> int:
        """Exclusive byte end of the view inside its segment (protocol §4.3).

        ``itemsize * (storage_offset + 1 + sum((shape[i] - 1) * stride[i]))``,
        or 0 when any dimension is 0.
        """
        if any(n == 0 for n in self.shape):
            return 0
        last = self.storage_offset + sum(
            (n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)
        )
        return self.itemsize * (last + 1)

    @classmethod
    def from_cpu_shm(cls, payload: Mapping[str, Any]) -> TensorDesc:
        """Build from a decoded ``cpu_shm`` wrapper map (protocol §4.3).

        ``payload`` is ``{"shm_name", "nbytes", "metadata": {"dtype", "shape",
        "stride", "storage_offset", "device_uuid"}, ...}``; other keys are the
        wire layer's business and are ignored here.
        """
        try:
            meta = payload["metadata"]
            return cls(
                dtype=meta["dtype"],
                shape=meta["shape"],
                stride=meta["stride"],
                storage_offset=meta["storage_offset"],
                shm_name=payload["shm_name"],
                nbytes=payload["nbytes"],
            )
        except (KeyError, TypeError) as exc:
            raise RegistrationError(f"malformed cpu_shm descriptor: {exc!r}") from None
