"""Pickle codec: restricted decoding (torch-free, hand-built payloads) and torch round trips.

The hand-built payloads reproduce, opcode by opcode, what ``pickle.dumps``
of a ``list[torch.Tensor]`` produces, so the parser is exercised without
torch; the real thing is checked in the torch venv by ``pickle_probe.py``.
"""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
from transfer_testlib import run_probe

from kvhive.errors import BadRequest, UnsupportedError
from kvhive.transfer import pickle_codec
from kvhive.transfer.pickle_codec import DecodedTensor

MAGIC = 0x1950A86A20F9469CFC6C


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def storage_stream(storage_cls: str, numel: int, data: bytes, key: str = "94468887078928") -> bytes:
    """What ``torch.save(storage, _use_new_zipfile_serialization=False)`` writes."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    record = (
        b"\x80\x02"
        + _tuple(
            [
                _str("storage"),
                _global("torch", storage_cls),
                _str(key),
                _str("cpu"),
                _int(numel),
                b"N",
            ]
        )
        + b"Q."  # BINPERSID, STOP
    )
    return (
        pickle.dumps(MAGIC, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps(info, protocol=2)
        + record
        + pickle.dumps([key], protocol=2)
        + struct.pack("<q", numel)
        + data
    )


def tensor_ops(
    stream: bytes,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    v3_dtype: str | None = None,
) -> bytes:
    """Opcodes of one ``_rebuild_tensor_v2/v3(...)`` call."""
    load = (
        _global("torch.storage", "_load_from_bytes")
        + b"B"
        + struct.pack("<I", len(stream))
        + stream
        + b"\x85R"
    )
    hooks = _global("collections", "OrderedDict") + b")R"
    args = [
        load,
        _int(offset),
        _tuple([_int(n) for n in size]),
        _tuple([_int(s) for s in stride]),
        b"\x89",
        hooks,
    ]
    fn = "_rebuild_tensor_v2"
    if v3_dtype is not None:
        args.append(_global("torch", v3_dtype))
        fn = "_rebuild_tensor_v3"
    return _global("torch._utils", fn) + _tuple(args) + b"R"


def payload(tensors: list[bytes]) -> bytes:
    return b"\x80\x03](" + b"".join(tensors) + b"e."


def test_handmade_payload_decodes() -> None:
    data = np.arange(12, dtype="<u2").tobytes()  # 12 bf16 elements
    stream = storage_stream("BFloat16Storage", 12, data)
    p = payload(
        [
            tensor_ops(stream, 0, (3, 4), (4, 1)),  # contiguous
            tensor_ops(stream, 1, (2, 3), (1, 4)),  # transposed view with an offset
            tensor_ops(stream, 5, (0, 3), (3, 1)),  # empty
        ]
    )
    out = pickle_codec._decode(p)
    assert [t.shape for t in out] == [(3, 4), (2, 3), (0, 3)]
    assert all(t.dtype == "bfloat16" for t in out)
    whole = np.arange(12, dtype="<u2")
    assert out[0].data.tobytes() == data
    assert out[1].data.view("<u2").tolist() == whole[1:].reshape(-1)[[0, 4, 8, 1, 5, 9]].tolist()
    assert out[2].data.size == 0
    assert all(t.data.dtype == np.uint8 and t.data.flags.c_contiguous for t in out)


def test_handmade_v3_payload_untyped_storage() -> None:
    data = bytes(range(10))
    p = payload(
        [tensor_ops(storage_stream("UntypedStorage", 10, data), 2, (2, 4), (4, 1), "float8_e4m3fn")]
    )
    (t,) = pickle_codec._decode(p)
    assert t == DecodedTensor("float8_e4m3fn", (2, 4), t.data) and t.data.tobytes() == data[2:]


@pytest.mark.parametrize(
    ("evil", "match"),
    [
        (b"\x80\x03cos\nsystem\n" + _str("echo pwned") + b"\x85R.", "forbidden global os.system"),
        (b"\x80\x03cbuiltins\neval\n" + _str("1") + b"\x85R.", "forbidden global builtins.eval"),
        (b"\x80\x03ctorch\nload\n)R.", "forbidden global torch.load"),
        (b"\x80\x03ctorch.storage\n_load_from_bytes\n" + _str("x") + b"\x85R.", "not bytes"),
        (b"\x80\x03" + _str("hello") + b".", "not a list of tensors"),
        (b"\x80\x03](J\x01\x00\x00\x00e.", "not a list of tensors"),
        (b"\x80\x03" + _str("pid") + b"Q.", "persistent id"),
        (b"\x80\x03](", "UnpicklingError|EOFError"),
        (b"garbage", "invalid tensor pickle"),
    ],
)
def test_restricted_unpickler_rejects(evil: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        pickle_codec._decode(evil)


def test_storage_stream_global_is_restricted() -> None:
    stream = storage_stream("BFloat16Storage", 2, b"\0" * 4).replace(
        _global("torch", "BFloat16Storage"), _global("posix", "system")
    )
    with pytest.raises(BadRequest):
        pickle_codec._decode(payload([tensor_ops(stream, 0, (2,), (1,))]))


@pytest.mark.parametrize(
    ("size", "stride", "offset", "match"),
    [
        ((4,), (1,), 0, "more elements than its storage"),
        ((2,), (2,), 1, "exceeds its storage"),
        ((100000, 100000), (0, 0), 0, "more elements"),  # no broadcast blow-up
        ((2,), (1, 1), 0, "ranks differ"),
    ],
)
def test_view_must_fit_its_storage(
    size: tuple[int, ...], stride: tuple[int, ...], offset: int, match: str
) -> None:
    stream = storage_stream("FloatStorage", 3, b"\0" * 12)
    with pytest.raises(BadRequest, match=match):
        pickle_codec._decode(payload([tensor_ops(stream, offset, size, stride)]))


def test_truncated_or_inconsistent_storage() -> None:
    good = storage_stream("FloatStorage", 3, b"\0" * 12)
    with pytest.raises(BadRequest, match="truncated"):
        pickle_codec._decode(payload([tensor_ops(good[:-1], 0, (3,), (1,))]))
    bad_count = good[: -12 - 8] + struct.pack("<q", 2) + b"\0" * 12
    with pytest.raises(BadRequest, match="element count"):
        pickle_codec._decode(payload([tensor_ops(bad_count, 0, (3,), (1,))]))
    bad_magic = pickle.dumps(7, protocol=2) + good[len(pickle.dumps(MAGIC, protocol=2)) :]
    with pytest.raises(BadRequest, match="magic"):
        pickle_codec._decode(payload([tensor_ops(bad_magic, 0, (3,), (1,))]))


def test_torch_available_is_a_bool() -> None:
    assert isinstance(pickle_codec.torch_available(), bool)


@pytest.mark.skipif(pickle_codec.torch_available(), reason="torch is installed here")
def test_without_torch_both_directions_are_unsupported() -> None:
    msg = "engine-driven pickle transfer needs torch: pip install 'kvhive\\[torch\\]'"
    with pytest.raises(UnsupportedError, match=msg):
        pickle_codec.decode_tensors(b"\x80\x03].")
    with pytest.raises(UnsupportedError, match=msg):
        pickle_codec.decode_tensor_list(b"\x80\x03].")
    with pytest.raises(UnsupportedError, match=msg):
        pickle_codec.encode_tensors([np.zeros(4, np.uint8)], (2,), "bfloat16")


def test_torch_round_trips_in_the_torch_venv(probe_python: object) -> None:
    out = run_probe(probe_python, "pickle_probe.py")  # type: ignore[arg-type]
    assert out.rstrip().endswith("ALL OK"), out
