"""TensorDesc: dtype table, byte span, validation."""

from __future__ import annotations

import pytest

from kvhive.errors import RegistrationError
from kvhive.transfer.descriptors import TensorDesc, canonical_dtype, itemsize, validate_shm_name
from support.descriptors import cpu_shm_payload


def desc(**kw: object) -> TensorDesc:
    base: dict[str, object] = dict(
        dtype="float16",
        shape=(2, 8, 16, 4, 8),
        stride=(4096, 512, 32, 8, 1),
        storage_offset=0,
        shm_name="/lmcache_kv_1_0",
        nbytes=16384,
    )
    base.update(kw)
    return TensorDesc(**base)  # type: ignore[arg-type]


def test_spec_example_spans_the_whole_segment() -> None:
    d = desc()
    assert d.byte_span() == 16384
    assert d.shm_name == "lmcache_kv_1_0"  # leading "/" dropped
    assert d.itemsize == 2 and d.numel == 8192 and d.view_nbytes == 16384


@pytest.mark.parametrize(
    ("dtype", "size"),
    [
        ("bfloat16", 2),
        ("float16", 2),
        ("float32", 4),
        ("float8_e4m3fn", 1),
        ("float8_e5m2", 1),
        ("uint8", 1),
        ("int64", 8),
        ("complex128", 16),
        ("half", 2),
        ("torch.bfloat16", 2),
    ],
)
def test_itemsize(dtype: str, size: int) -> None:
    assert itemsize(dtype) == size


def test_aliases_are_canonicalised() -> None:
    assert canonical_dtype("half") == "float16"
    assert desc(dtype="torch.half").dtype == "float16"


def test_unknown_dtype() -> None:
    with pytest.raises(RegistrationError, match="unknown dtype"):
        itemsize("float7")
    with pytest.raises(RegistrationError, match="unknown dtype"):
        desc(dtype="bfloat17")


def test_span_formula_with_offset_and_strides() -> None:
    # itemsize * (offset + 1 + sum((n-1)*s)) = 4 * (10 + 1 + 1*7 + 2*2) = 88
    d = TensorDesc("float32", (2, 3), (7, 2), 10, "seg", 88)
    assert d.byte_span() == 88
    with pytest.raises(RegistrationError, match="ends at byte 88"):
        TensorDesc("float32", (2, 3), (7, 2), 10, "seg", 87)


def test_zero_dim_has_empty_span_and_needs_no_segment() -> None:
    d = TensorDesc("bfloat16", (0, 16, 8), (128, 8, 1), 5, "", 0)
    assert d.byte_span() == 0 and d.numel == 0


def test_scalar_view() -> None:
    assert TensorDesc("float32", (), (), 3, "seg", 16).byte_span() == 16


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(stride=(1, 1)), "rank"),
        (dict(shape=(2, -1, 16, 4, 8)), "non-negative"),
        (dict(stride=(4096, 512, 32, 8, True)), "integers"),
        (dict(shape="abc"), "sequence"),
        (dict(storage_offset=-1), "storage_offset"),
        (dict(storage_offset=1.0), "storage_offset"),
        (dict(nbytes=-5), "nbytes"),
        (dict(nbytes=16383), "ends at byte 16384"),
        (dict(storage_offset=1), "ends at byte 16386"),
        (dict(shm_name=""), "empty"),
        (dict(shm_name="/"), "empty"),
        (dict(shm_name="../etc/passwd"), "invalid"),
        (dict(shm_name="a/b"), "invalid"),
        (dict(shm_name=".."), "invalid"),
        (dict(shm_name="x\x00y"), "invalid"),
        (dict(shm_name="x" * 256), "longer"),
        (dict(shm_name=7), "string"),
        (dict(shape=(1,) * 17, stride=(1,) * 17), "exceeds"),
    ],
)
def test_validation_errors(kw: dict[str, object], match: str) -> None:
    with pytest.raises(RegistrationError, match=match):
        desc(**kw)


def test_validate_shm_name() -> None:
    assert validate_shm_name("/lmcache_kv_12_3") == "lmcache_kv_12_3"
    assert validate_shm_name("plain") == "plain"


def test_frozen_and_hashable() -> None:
    d = desc()
    with pytest.raises(AttributeError):
        d.nbytes = 1  # type: ignore[misc]
    assert hash(d) == hash(desc())
    assert d.shape == (2, 8, 16, 4, 8) and isinstance(desc(shape=[2, 8, 16, 4, 8]).shape, tuple)


def test_from_cpu_shm_payload() -> None:
    payload = cpu_shm_payload(
        "/lmcache_kv_1_0", "float16", [2, 8, 16, 4, 8], stride=[4096, 512, 32, 8, 1], nbytes=16384
    )
    assert TensorDesc.from_cpu_shm(payload) == desc()
    with pytest.raises(RegistrationError, match="malformed"):
        TensorDesc.from_cpu_shm({"shm_name": "x", "nbytes": 1})
