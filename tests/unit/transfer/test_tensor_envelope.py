"""0.5.7's inline tensor envelopes without torch: round trips, the payload sniff, and
every check against the registered layout."""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pytest

from kvhive.errors import BadRequest
from kvhive.transfer import tensor_envelope as te

LAYOUT = te.TensorLayout.of((2, 3, 4, 8), "half")  # canonical dtype on the wire
NBYTES = 2 * 3 * 4 * 8 * 2


def chunks(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, NBYTES, np.uint8).tobytes() for _ in range(n)]


def frame(dtype: str = "float16", shape: list[int] | None = None, data: bytes | None = None):
    return {"dtype": dtype, "shape": shape or [2, 3, 4, 8], "data": data or bytes(NBYTES)}


def test_layout_names_the_dtype_as_torch_does():
    assert LAYOUT.dtype == "float16" and LAYOUT.nbytes == NBYTES


def test_flat_round_trip_is_byte_exact_and_zero_copy():
    data = chunks(3)
    payload = te.encode_tensors([np.frombuffer(d, np.uint8) for d in data], LAYOUT)
    assert te.payload_form(payload) == "envelope" and not te.is_grouped(payload)
    raw = msgspec.msgpack.decode(payload)
    assert raw["version"] == 1 and raw["tensors"][0]["shape"] == [2, 3, 4, 8]
    back = te.decode_tensors(payload, LAYOUT, 3)
    assert [bytes(b) for b in back] == data
    assert all(b.obj is payload for b in back)


def test_grouped_round_trip_names_the_chunks_each_group_carries():
    data = chunks(2, seed=1)
    payload = te.encode_grouped([([0, 2], data, LAYOUT)])
    assert te.payload_form(payload) == "envelope" and te.is_grouped(payload)
    [(indices, back)] = te.decode_grouped(payload, [(LAYOUT, 3)])
    assert indices == [0, 2] and [bytes(b) for b in back] == data


def test_a_pickle_is_told_from_an_envelope_by_its_first_byte():
    assert te.payload_form(pickle.dumps([b"x"], protocol=2)) == "pickle"
    assert te.payload_form(pickle.dumps([b"x"], protocol=5)) == "pickle"
    for bad in (b"", b"\x93\x01\x02\x03", b"(lp0"):
        with pytest.raises(BadRequest, match="invalid tensor envelope"):
            te.payload_form(bad)


@pytest.mark.parametrize(
    ("env", "count", "names"),
    [
        ({"version": 1, "tensors": [frame()]}, 2, "tensors holds 1 tensors for 2 chunks"),
        ({"version": 1, "tensors": [frame(dtype="bfloat16")]}, 1, "tensors[0].dtype 'bfloat16'"),
        ({"version": 1, "tensors": [frame(dtype="float13")]}, 1, "not a torch dtype"),
        (
            {"version": 1, "tensors": [frame(shape=[2, 3, 8, 4])]},
            1,
            "tensors[0].shape (2, 3, 8, 4)",
        ),
        ({"version": 1, "tensors": [frame(data=b"\0" * 8)]}, 1, "tensors[0].data holds 8 bytes"),
        ({"version": 2, "tensors": [frame()]}, 1, "version"),
        ({"version": 1, "tensors": [frame()], "extra": 1}, 1, "unknown field `extra`"),
        ({"version": 1, "tensors": [{**frame(), "stride": [1]}]}, 1, "unknown field `stride`"),
        ({"version": 1, "tensors": [frame(shape=[1] * 17)]}, 1, "length <= 16"),
        ({"version": 1, "tensors": [frame(shape=[-1, 3, 4, 8])]}, 1, ">= 0"),
        ({"version": 1}, 1, "missing required field `tensors`"),
    ],
)
def test_flat_envelopes_that_do_not_fit_name_the_field(env, count, names):
    with pytest.raises(BadRequest) as err:
        te.decode_tensors(msgspec.msgpack.encode(env), LAYOUT, count)
    assert names in str(err.value)


@pytest.mark.parametrize(
    ("groups", "names"),
    [
        ([{"chunk_indices": [1, 0], "tensors": [frame(), frame()]}], "not strictly increasing"),
        ([{"chunk_indices": [3], "tensors": [frame()]}], "name chunk 3 of 3"),
        ([{"chunk_indices": [0, 1], "tensors": [frame()]}], "2 chunk_indices for 1 tensors"),
        (
            [{"chunk_indices": [0], "tensors": [frame(dtype="float32")]}],
            "groups[0].tensors[0].dtype",
        ),
        ([], "groups holds 0 groups, 1 registered"),
    ],
)
def test_grouped_envelopes_that_do_not_fit_name_the_field(groups, names):
    payload = msgspec.msgpack.encode({"version": 1, "groups": groups})
    with pytest.raises(BadRequest) as err:
        te.decode_grouped(payload, [(LAYOUT, 3)])
    assert names in str(err.value)


def test_limits_are_the_057_limits():
    assert (te.MAX_TENSORS, te.MAX_RANK, te.MAX_GROUPS) == (65536, 16, 64)
    assert te.MAX_TENSOR_BYTES == 2 << 30 and te.MAX_TOTAL_BYTES == 16 << 30
    with pytest.raises(BadRequest, match="at most 65536"):
        te.decode_tensors(b"\x82", LAYOUT, 65537)
    too_many = {"version": 1, "groups": [{"chunk_indices": [], "tensors": []}] * 65}
    with pytest.raises(BadRequest, match="length <= 64"):
        te.decode_grouped(msgspec.msgpack.encode(too_many), [(LAYOUT, 1)] * 64)
    with pytest.raises(ValueError, match="layout needs"):
        te.encode_tensors([b"\0" * 3], LAYOUT)
