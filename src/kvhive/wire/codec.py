"""Frame codec: op frames, typed argument decoding, result encoding, error replies.

Request  ``[identity | uid | op | arg_1 .. arg_n]`` (identity added by ROUTER)
Reply    ``[identity | uid | op | result?]`` — the result frame is omitted for ``None``.
Error    ``[identity | uid | b"error: <code>: <message>" (msgpack str) | {code, message}]``:
the 0.5.6 client compares the echoed op with its pending request and fails that
future at once on a mismatch, instead of waiting ``mq_timeout``.

Bounds (every way out is a :class:`ProtocolError`, never another exception):

- size: an op frame over ``MAX_OP_FRAME_BYTES``, argument frames over the op's
  ``max_arg_bytes`` and arrays over an ``ItemCap`` are refused before decoding
  (:func:`check_frames`), so the loop thread never decodes more than a few bytes for an
  INLINE op and a 10,000-layer registration costs a header read;
- count: a request carries the op's argument frames, or fewer by the trailing arguments
  that have defaults (0.5.6 clients do not send what 0.5.7 appended); the missing ones take
  their defaults, and any other count is refused naming the op and the counts it takes;
- depth: op frames and typed positions are decoded by typed decoders, which stop at the
  first value of the wrong shape (a nested array where an int belongs is one error, not
  2,000 levels of recursion); only ``Any`` positions (``request_configs``, layout hints,
  descriptor ext payloads) recurse, and msgspec bounds that by the interpreter's recursion
  limit with a ``RecursionError``, which becomes a ``RequestTooLarge`` here.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvhive.errors import ProtocolError, RequestTooLarge, UnknownOperation
from kvhive.wire import types as t
from kvhive.wire.ops import LEGACY_IDS, MAX_OP_FRAME_BYTES, OPS, OpSpec

_ENCODER = msgspec.msgpack.Encoder()
_OP_DECODER = msgspec.msgpack.Decoder(int | str)
DESCRIPTORS = "descriptors"
IPC_EXT_CODE = 1


def _descriptor_from_ext(code: int, data: memoryview) -> Any:
    if code != IPC_EXT_CODE:
        raise ProtocolError(f"unsupported msgpack ext type {code}")
    raw = msgspec.msgpack.decode(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ProtocolError("IPC descriptor must be a map with a 'type' tag")
    return t.descriptor_from_map(raw)


_DESCRIPTOR_DECODER = msgspec.msgpack.Decoder(list[Any], ext_hook=_descriptor_from_ext)


_BOOL_OR_INT = msgspec.msgpack.Decoder(bool | int)


_KEY_DECODER = msgspec.msgpack.Decoder(t.KeyFrame)


def _decode_key(frame: bytes) -> t.CacheKey:
    """A key in either version's form (``token_ids`` or ``token_bytes``, by field name)."""
    return t.key_from_frame(_KEY_DECODER.decode(frame))


def _make_decoder(arg_type: Any) -> Any:
    """A callable bytes -> value for one argument type (typed: msgspec never takes a
    bool for an int, and stops at the first value of the wrong shape)."""
    if arg_type is DESCRIPTORS:
        return _DESCRIPTOR_DECODER.decode
    if arg_type is bool:
        return _coerce_bool
    if arg_type is t.CacheKey:
        return _decode_key
    return msgspec.msgpack.Decoder(arg_type).decode


def _coerce_bool(frame: bytes) -> bool:
    """A bool; an int is taken as its truth value (clients send ``clear(1)``)."""
    return bool(_BOOL_OR_INT.decode(frame))


def _array_len(frame: bytes) -> int | None:
    """The entry count in a msgpack array header; None when ``frame`` is no array."""
    if not frame:
        return None
    head = frame[0]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC and len(frame) >= 3:
        return int.from_bytes(frame[1:3], "big")
    if head == 0xDD and len(frame) >= 5:
        return int.from_bytes(frame[1:5], "big")
    return None


_ARG_DECODERS: dict[str, tuple[Any, ...]] = {
    name: tuple(_make_decoder(a) for a in spec.args) for name, spec in OPS.items()
}


def decode_op(frame: bytes) -> OpSpec:
    """Map an op frame (legacy int id or name string) to its spec.  A frame longer than
    ``MAX_OP_FRAME_BYTES`` is refused without being decoded."""
    if len(frame) > MAX_OP_FRAME_BYTES:
        raise RequestTooLarge(
            f"operation frame of {len(frame)} bytes (an op is an int id or a name of at "
            f"most {MAX_OP_FRAME_BYTES} bytes)"
        )
    try:
        value = _OP_DECODER.decode(frame)
    except msgspec.ValidationError:  # (a DecodeError too: caught first)
        raise ProtocolError(f"operation must be an int id or a name, got {frame!r:.40}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable operation frame: {exc}") from None
    name = LEGACY_IDS.get(value) if isinstance(value, int) else value
    spec = OPS.get(name) if name is not None else None
    if spec is None:
        raise UnknownOperation(f"unknown or unsupported operation {value!r:.60}")
    return spec


def check_frames(spec: OpSpec, frames: list[bytes]) -> None:
    """The checks that need no decoding: argument count, total size, array entry counts.
    O(number of frames); safe on the loop thread for any request."""
    most, least = len(spec.args), spec.min_args
    if not least <= len(frames) <= most:
        takes = f"{most}" if least == most else f"{least} (0.5.6) or {most} (0.5.7)"
        raise ProtocolError(f"{spec.name} takes {takes} argument frame(s), got {len(frames)}")
    if spec.max_arg_bytes is not None:
        size = sum(map(len, frames))
        if size > spec.max_arg_bytes:
            raise RequestTooLarge(
                f"{spec.name}: {size} bytes of arguments, at most {spec.max_arg_bytes} accepted"
            )
    for cap in spec.item_caps:
        if cap.arg >= len(frames):
            continue  # an optional argument that was not sent
        n = _array_len(frames[cap.arg])
        if n is not None and n > cap.limit:
            raise RequestTooLarge(f"{spec.name}: {n} {cap.what}, at most {cap.limit} accepted")


def decode_args(spec: OpSpec, frames: list[bytes]) -> list[Any]:
    """Decode argument frames after :func:`check_frames`.  Raises only ``ProtocolError``
    (``RequestTooLarge`` for a limit, nesting past the recursion limit included)."""
    check_frames(spec, frames)
    args = []
    for i, (decode, frame) in enumerate(zip(_ARG_DECODERS[spec.name], frames, strict=False)):
        try:
            args.append(decode(frame))
        except (msgspec.DecodeError, msgspec.ValidationError, ProtocolError) as exc:
            raise ProtocolError(f"{spec.name}: argument {i + 1} is invalid: {exc}") from None
        except RecursionError:
            raise RequestTooLarge(f"{spec.name}: argument {i + 1} is nested too deeply") from None
        except MemoryError:
            raise RequestTooLarge(f"{spec.name}: argument {i + 1} is too large to decode") from None
    if len(args) < len(spec.args):  # trailing arguments the client's version does not send
        args.extend(spec.defaults[len(args) - spec.min_args :])
    if spec.over_limit is not None and (reason := spec.over_limit(args)) is not None:
        raise RequestTooLarge(f"{spec.name}: {reason}")
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
