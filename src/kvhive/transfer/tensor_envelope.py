"""0.5.7's inline tensor envelopes for engine-driven transfers, without torch.

A 0.5.7 worker without the server's shared L1 pool sends each store as a msgpack
envelope in ``commit_store``'s data and expects the same in ``prepare_retrieve``'s reply
(0.5.6 workers send torch pickles instead: :mod:`kvhive.transfer.pickle_codec`)::

    TensorEnvelope         {version: 1, tensors: [TensorFrame, ...]}        one group
    GroupedTensorEnvelope  {version: 1, groups: [TensorGroup, ...]}         hybrid KV
    TensorGroup            {chunk_indices: [int, ...], tensors: [TensorFrame, ...]}
    TensorFrame            {dtype: "float16", shape: [2, L, C, H], data: <raw C-order bytes>}

Every struct forbids unknown fields; limits as 0.5.7 sets them: at most 65536 tensors,
16 dimensions, 2 GiB per tensor, 16 GiB in all, 64 groups.  A decoded tensor is a
zero-copy ``memoryview`` of the payload, checked against the layout the worker registered
(dtype, shape, byte length) and the count of chunks its key names.

Telling the two payload forms apart needs one byte: a pickle starts with the PROTO opcode
``0x80`` (protocols 2-5; torch pickles are never older), an envelope with a msgpack map
header (``0x81``-``0x8f``, ``0xde``, ``0xdf``; an envelope has two fields, ``0x82``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from kvhive.errors import BadRequest, RegistrationError
from kvhive.transfer.descriptors import canonical_dtype, itemsize

ENVELOPE_VERSION: Literal[1] = 1
MAX_TENSORS = 65536
MAX_RANK = 16
MAX_TENSOR_BYTES = 2 * 1024 * 1024 * 1024
MAX_TOTAL_BYTES = 16 * 1024 * 1024 * 1024
MAX_GROUPS = 64
_METADATA_BYTES_PER_TENSOR = 1024  # msgpack overhead allowed per tensor on top of its data

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_Shape = Annotated[list[_NonNegative], msgspec.Meta(max_length=MAX_RANK)]
_Data = Annotated[memoryview, msgspec.Meta(max_length=MAX_TENSOR_BYTES)]


class TensorFrame(msgspec.Struct, forbid_unknown_fields=True):
    """One contiguous tensor: dtype name (no ``torch.`` prefix), shape, raw bytes."""

    dtype: str
    shape: _Shape
    data: _Data


_Frames = Annotated[list[TensorFrame], msgspec.Meta(max_length=MAX_TENSORS)]


class TensorEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    version: Literal[1]
    tensors: _Frames


class TensorGroup(msgspec.Struct, forbid_unknown_fields=True):
    """One KV group's tensors and the chunk position (in the key's range) each fills."""

    chunk_indices: Annotated[list[_NonNegative], msgspec.Meta(max_length=MAX_TENSORS)]
    tensors: _Frames


class GroupedTensorEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    version: Literal[1]
    groups: Annotated[list[TensorGroup], msgspec.Meta(max_length=MAX_GROUPS)]


_FLAT = msgspec.msgpack.Decoder(TensorEnvelope)
_GROUPED = msgspec.msgpack.Decoder(GroupedTensorEnvelope)
_ENCODER = msgspec.msgpack.Encoder()

PayloadForm = Literal["envelope", "pickle"]


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """What every tensor of one group must be: the registered object's shape and dtype."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, shape: Sequence[int], dtype: str) -> TensorLayout:
        """The layout with ``dtype`` canonical (``"half"`` -> ``"float16"``, as torch names
        it on the wire); RegistrationError for an unknown dtype."""
        return cls(tuple(shape), canonical_dtype(dtype))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def _bad(msg: str) -> BadRequest:
    return BadRequest(f"invalid tensor envelope: {msg}")


def payload_form(payload: bytes | memoryview) -> PayloadForm:
    """Which form a ``commit_store`` payload has (module docstring); BadRequest for
    neither."""
    if not len(payload):
        raise _bad("empty payload")
    head = payload[0]
    if head == 0x80:
        return "pickle"
    if 0x81 <= head <= 0x8F or head in (0xDE, 0xDF):
        return "envelope"
    raise _bad(f"payload starts with byte 0x{head:02x}: neither a msgpack map nor a pickle")


def is_grouped(payload: bytes | memoryview) -> bool:
    """Whether an envelope payload is a :class:`GroupedTensorEnvelope` (its field names
    differ from a flat envelope's, so the raw map says; decoding checks the rest)."""
    try:
        raw = msgspec.msgpack.decode(payload, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _bad(str(exc)) from None
    return "groups" in raw


def _check_size(payload: bytes | memoryview, count: int) -> None:
    if len(payload) > MAX_TOTAL_BYTES + _METADATA_BYTES_PER_TENSOR * count:
        raise _bad(f"{len(payload)} bytes is over the wire-format limit for {count} tensors")


def _check_frames(
    frames: Sequence[TensorFrame], layout: TensorLayout, where: str, total: int
) -> tuple[list[memoryview], int]:
    """Each frame against ``layout``; returns the tensors' bytes and the running total."""
    want = layout.nbytes
    out: list[memoryview] = []
    for i, f in enumerate(frames):
        try:
            dtype = canonical_dtype(f.dtype)
        except RegistrationError:
            raise _bad(f"{where}[{i}].dtype {f.dtype!r} is not a torch dtype") from None
        if dtype != layout.dtype:
            raise _bad(
                f"{where}[{i}].dtype {f.dtype!r} differs from the registered {layout.dtype!r}"
            )
        if tuple(f.shape) != layout.shape:
            raise _bad(
                f"{where}[{i}].shape {tuple(f.shape)} differs from the registered {layout.shape}"
            )
        if len(f.data) != want:
            raise _bad(f"{where}[{i}].data holds {len(f.data)} bytes, the shape needs {want}")
        total += want
        if total > MAX_TOTAL_BYTES:
            raise _bad(f"tensors over {MAX_TOTAL_BYTES} bytes in all")
        out.append(f.data)
    return out, total


def decode_tensors(
    payload: bytes | memoryview, layout: TensorLayout, count: int
) -> list[memoryview]:
    """The ``count`` tensors of a :class:`TensorEnvelope`, each checked against ``layout``;
    zero-copy views of ``payload``.  BadRequest naming the field that does not fit."""
    if not 0 <= count <= MAX_TENSORS:
        raise _bad(f"{count} tensors expected, at most {MAX_TENSORS}")
    _check_size(payload, count)
    try:
        env = _FLAT.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _bad(str(exc)) from None
    if len(env.tensors) != count:
        raise _bad(f"tensors holds {len(env.tensors)} tensors for {count} chunks")
    return _check_frames(env.tensors, layout, "tensors", 0)[0]


def decode_grouped(
    payload: bytes | memoryview, groups: Sequence[tuple[TensorLayout, int]]
) -> list[tuple[list[int], list[memoryview]]]:
    """A :class:`GroupedTensorEnvelope` against one ``(layout, chunks in range)`` per
    group: per group, the chunk positions it carries (strictly increasing, in range) and
    their tensors (zero-copy).  BadRequest naming the field that does not fit."""
    if len(groups) > MAX_GROUPS:
        raise _bad(f"{len(groups)} groups expected, at most {MAX_GROUPS}")
    expected = sum(n for _, n in groups)
    if expected > MAX_TENSORS:
        raise _bad(f"{expected} tensors expected, at most {MAX_TENSORS}")
    _check_size(payload, expected)
    try:
        env = _GROUPED.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _bad(str(exc)) from None
    if len(env.groups) != len(groups):
        raise _bad(f"groups holds {len(env.groups)} groups, {len(groups)} registered")
    out: list[tuple[list[int], list[memoryview]]] = []
    total = 0
    for g, (group, (layout, n_chunks)) in enumerate(zip(env.groups, groups, strict=True)):
        idx = group.chunk_indices
        if len(idx) != len(group.tensors):
            raise _bad(f"groups[{g}] has {len(idx)} chunk_indices for {len(group.tensors)} tensors")
        if any(b <= a for a, b in itertools.pairwise(idx)):
            raise _bad(f"groups[{g}].chunk_indices are not strictly increasing")
        if idx and idx[-1] >= n_chunks:
            raise _bad(f"groups[{g}].chunk_indices name chunk {idx[-1]} of {n_chunks}")
        tensors, total = _check_frames(group.tensors, layout, f"groups[{g}].tensors", total)
        out.append((list(idx), tensors))
    return out


def _frames(tensors: Sequence[Any], layout: TensorLayout) -> list[TensorFrame]:
    want = layout.nbytes
    frames = []
    for i, data in enumerate(tensors):
        view = memoryview(data).cast("B")
        if len(view) != want:
            raise ValueError(f"tensor {i} holds {len(view)} bytes, the layout needs {want}")
        frames.append(TensorFrame(layout.dtype, list(layout.shape), view))
    return frames


def encode_tensors(tensors: Sequence[Any], layout: TensorLayout) -> bytes:
    """A :class:`TensorEnvelope` of ``tensors`` (buffers of C-order bytes, e.g. L1 views),
    all of ``layout``."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors, at most {MAX_TENSORS} per envelope")
    return _ENCODER.encode(TensorEnvelope(ENVELOPE_VERSION, _frames(tensors, layout)))


def encode_grouped(
    groups: Sequence[tuple[Sequence[int], Sequence[Any], TensorLayout]],
) -> bytes:
    """A :class:`GroupedTensorEnvelope`: per group its chunk positions, tensors, layout."""
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"{len(groups)} groups, at most {MAX_GROUPS} per envelope")
    return _ENCODER.encode(
        GroupedTensorEnvelope(
            ENVELOPE_VERSION,
            [TensorGroup(list(idx), _frames(ts, layout)) for idx, ts, layout in groups],
        )
    )
