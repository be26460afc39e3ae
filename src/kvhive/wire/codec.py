"""Frame codec: op frames, typed argument decoding, result encoding, error replies.

Request  ``[identity | uid | op | arg_1 .. arg_n]`` (identity added by ROUTER)
Reply    ``[identity | uid | op | result?]`` — the result frame is omitted for ``None``.
Error    ``[identity | uid | b"error: <code>: <message>" (msgpack str) | {code, message}]``:
the 0.5.6 client compares the echoed op with its pending request and fails that
future at once on a mismatch, instead of waiting ``mq_timeout``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvhive.errors import ProtocolError, UnknownOperation
from kvhive.wire import types as t
from kvhive.wire.ops import LEGACY_IDS, OPS, OpSpec

_ENCODER = msgspec.msgpack.Encoder()
_UNTYPED = msgspec.msgpack.Decoder()
DESCRIPTORS = "descriptors"
IPC_EXT_CODE = 1


def _descriptor_from_ext(code: int, data: memoryview) -> Any:
    if code != IPC_EXT_CODE:
        raise ProtocolError(f"unsupported msgpack ext type {code}")
    raw = msgspec.msgpack.decode(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ProtocolError("IPC descriptor must be a map with a 'type' tag")
    if raw["type"] == "cpu_shm":
        return msgspec.convert(raw, t.CpuShmDescriptor)
    return t.OtherDescriptor(type=raw["type"])


_DESCRIPTOR_DECODER = msgspec.msgpack.Decoder(list[Any], ext_hook=_descriptor_from_ext)


def _make_decoder(arg_type: Any) -> Any:
    """A callable bytes -> value for one argument type."""
    if arg_type is DESCRIPTORS:
        return _DESCRIPTOR_DECODER.decode
    if arg_type is int:
        return _coerce_int
    if arg_type is bool:
        return _coerce_bool
    if arg_type == (int | None):
        return _coerce_optional_int
    return msgspec.msgpack.Decoder(arg_type).decode


def _coerce_int(frame: bytes) -> int:
    value = _UNTYPED.decode(frame)
    if isinstance(value, bool) or not isinstance(value, int):
        raise msgspec.ValidationError(f"expected int, got {type(value).__name__}")
    return value


def _coerce_bool(frame: bytes) -> bool:
    value = _UNTYPED.decode(frame)
    if not isinstance(value, (bool, int)):
        raise msgspec.ValidationError(f"expected bool, got {type(value).__name__}")
    return bool(value)


def _coerce_optional_int(frame: bytes) -> int | None:
    value = _UNTYPED.decode(frame)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise msgspec.ValidationError(f"expected int or nil, got {type(value).__name__}")
    return value


_ARG_DECODERS: dict[str, tuple[Any, ...]] = {
    name: tuple(_make_decoder(a) for a in spec.args) for name, spec in OPS.items()
}


def decode_op(frame: bytes) -> OpSpec:
    """Map an op frame (legacy int id or name string) to its spec."""
    try:
        value = _UNTYPED.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable operation frame: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProtocolError(f"operation must be an int id or a name, got {value!r:.40}")
    name = LEGACY_IDS.get(value) if isinstance(value, int) else value
    spec = OPS.get(name) if name is not None else None
    if spec is None:
        raise UnknownOperation(f"unknown or unsupported operation {value!r:.60}")
    return spec


def decode_args(spec: OpSpec, frames: list[bytes]) -> list[Any]:
    """Decode argument frames; the count must match the operation exactly."""
    decoders = _ARG_DECODERS[spec.name]
    if len(frames) != len(decoders):
        raise ProtocolError(
            f"{spec.name} takes {len(decoders)} argument frame(s), got {len(frames)}"
        )
    args = []
    for i, (decode, frame) in enumerate(zip(decoders, frames, strict=True)):
        try:
            args.append(decode(frame))
        except (msgspec.DecodeError, msgspec.ValidationError, ProtocolError) as exc:
            raise ProtocolError(f"{spec.name}: argument {i + 1} is invalid: {exc}") from None
    return args


def encode_result(result: Any) -> list[bytes]:
    """Result frames for a reply: none for ``None``, else one msgpack frame."""
    if result is None:
        return []
    return [_ENCODER.encode(result)]


def error_frames(code: str, message: str) -> list[bytes]:
    """Op frame plus payload of an error reply (see module docstring)."""
    message = message[:500]
    return [
        _ENCODER.encode(f"error: {code}: {message}"),
        _ENCODER.encode({"code": code, "message": message}),
    ]


def encode(value: Any) -> bytes:
    return _ENCODER.encode(value)
