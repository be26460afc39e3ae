"""Layout detection and group validation."""

from __future__ import annotations

import math

import pytest

from kvhive.errors import LayoutError
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.layouts import (
    KVFormat,
    detect_format,
    normalize_view,
    plan_layout,
    resolve_kv_layout,
)
from support.descriptors import contiguous_strides


def tdesc(
    shape: tuple[int, ...], dtype: str = "bfloat16", name: str = "seg", offset: int = 0
) -> TensorDesc:
    return TensorDesc(
        dtype, shape, contiguous_strides(shape), offset, name, (offset + math.prod(shape)) * 2 * 8
    )


def test_normalize_view_undoes_a_permute() -> None:
    # physical [2, NB=5, NH=2, BS=4, HS=3] exposed as logical NHD [2, 5, 4, 2, 3]
    phys = contiguous_strides((2, 5, 2, 4, 3))
    shape, stride = (2, 5, 4, 2, 3), (phys[0], phys[1], phys[3], phys[2], phys[4])
    assert normalize_view(shape, stride) == ((2, 5, 2, 4, 3), phys)


def test_normalize_view_keeps_contiguous_views() -> None:
    assert normalize_view((6, 2, 4, 6), (48, 24, 6, 1)) == ((6, 2, 4, 6), (48, 24, 6, 1))


def test_normalize_view_size_one_tie_goes_inner() -> None:
    # one head: head and token strides tie (both HS); the singleton goes innermost
    assert normalize_view((5, 1, 4, 8), (32, 8, 8, 1)) == ((5, 4, 1, 8), (32, 8, 8, 1))
    # a singleton with an odd stride is re-derived from the strides
    assert normalize_view((4, 1, 8), (8, 1, 1)) == ((4, 8, 1), (8, 1, 1))


def test_normalize_view_keeps_padded_views() -> None:
    # blocks-first cross-layer pool: dim 0 strides over all layers (padded)
    assert normalize_view((7, 4, 2, 6), (96, 12, 6, 1)) == ((7, 4, 2, 6), (96, 12, 6, 1))


@pytest.mark.parametrize(
    ("shape", "layout", "fmt"),
    [
        ((2, 9, 16, 8, 128), "NHD", KVFormat.NHD),
        ((2, 9, 8, 16, 128), "HND", KVFormat.HND),
        ((2, 9, 8, 16, 128), "BLHNC", KVFormat.HND),
        ((9, 2, 16, 8, 128), "NHD", KVFormat.FLASHINFER_NHD),
        ((9, 2, 8, 16, 128), "HND", KVFormat.FLASHINFER_HND),
        ((9, 16, 576), "NHD", KVFormat.MLA),
        ((9, 16, 576), "HND", KVFormat.MLA),
        ((9, 8, 16, 256), "HND", KVFormat.FUSED_HND),
        ((9, 16, 8, 256), "NHD", KVFormat.FUSED_NHD),
        ((9, 16, 8, 256), "BLNHC", KVFormat.FUSED_NHD),
        ((2, 2, 16, 8, 128), "NHD", KVFormat.NHD),  # K/V axis first wins, as in the reference
    ],
)
def test_detect_format(shape: tuple[int, ...], layout: str, fmt: KVFormat) -> None:
    assert detect_format(shape, layout, "bfloat16") is fmt


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((9, 16), "bfloat16", "unrecognised"),
        ((3, 9, 16, 8, 128), "bfloat16", "unrecognised"),
        ((9, 16, 132), "uint8", "DSA"),
        ((9, 16, 1, 132), "uint8", "DSA"),
        ((2, 9, 8, 1, 16, 128), "bfloat16", "RBLN"),
        ((9, 1, 2, 16, 8, 128), "bfloat16", "unrecognised"),
    ],
)
def test_detect_format_rejects(shape: tuple[int, ...], dtype: str, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        detect_format(shape, "NHD", dtype)


def test_resolve_kv_layout() -> None:
    assert resolve_kv_layout({}) == "HND"  # what a CPU reference server assumes
    assert resolve_kv_layout(None, default="NHD") == "NHD"
    assert resolve_kv_layout({"kv_layout": "BLNHC"}) == "BLNHC"
    with pytest.raises(LayoutError, match="kv_layout hint 'NCHW'"):
        resolve_kv_layout({"kv_layout": "NCHW"})


def test_plan_layout_geometry() -> None:
    descs = [tdesc((2, 9, 16, 8, 128), name=f"s{i}") for i in range(3)]
    lay = plan_layout(descs, {"kv_layout": "NHD"}, [])
    assert lay.fmt is KVFormat.NHD and lay.layer_indices == (0, 1, 2)
    assert (lay.kv_size, lay.num_blocks, lay.block_size, lay.num_heads, lay.head_size) == (
        2,
        9,
        16,
        8,
        128,
    )
    assert lay.object_shape(256) == (2, 3, 256, 1024)
    lay = plan_layout([tdesc((9, 8, 16, 256))], {"kv_layout": "HND"}, [])
    assert lay.object_shape(32) == (1, 1, 32, 2048) and lay.fmt is KVFormat.FUSED_HND
    lay = plan_layout([tdesc((9, 16, 576))], {}, [])
    assert lay.object_shape(32) == (1, 1, 32, 576)


def group(**kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        engine_group_id=0, layer_indices=[0, 1], tokens_per_block=16, sw_size_tokens=-1
    )
    base.update(kw)
    return base


def test_plan_layout_with_one_group() -> None:
    descs = [tdesc((2, 9, 16, 8, 128), name=f"s{i}") for i in range(3)]
    lay = plan_layout(descs, {"kv_layout": "NHD"}, [group(layer_indices=[2, 0])])
    assert lay.layer_indices == (0, 2) and lay.num_layers == 2
    lay = plan_layout(descs, {"kv_layout": "NHD"}, [group(layer_indices=[], tokens_per_block=0)])
    assert lay.layer_indices == (0, 1, 2)


class _Info:  # attribute-style group info (a decoded msgspec Struct)
    engine_group_id = 0
    layer_indices = (1,)
    tokens_per_block = 16
    sw_size_tokens = -1


def test_plan_layout_accepts_attribute_objects() -> None:
    descs = [tdesc((2, 9, 16, 8, 128), name=f"s{i}") for i in range(2)]
    assert plan_layout(descs, {"kv_layout": "NHD"}, [_Info()]).layer_indices == (1,)


@pytest.mark.parametrize(
    ("infos", "match"),
    [
        ([group(), group(engine_group_id=1)], "2 KV cache groups"),
        ([group(sw_size_tokens=4096)], "sliding-window"),
        ([group(recurrent_state=True)], "recurrent"),
        ([group(extra_object_group_tag=1)], "extra object"),
        ([group(engine_group_id=3)], "engine_group_id 0"),
        ([group(layer_indices=[0, 5])], "outside"),
        ([group(layer_indices=[0, 0])], "duplicate"),
        ([group(tokens_per_block=64)], "compressed"),
    ],
)
def test_plan_layout_rejects_groups(infos: list[dict[str, object]], match: str) -> None:
    descs = [tdesc((2, 9, 16, 8, 128), name=f"s{i}") for i in range(2)]
    with pytest.raises(LayoutError, match=match):
        plan_layout(descs, {"kv_layout": "NHD"}, infos)


def test_plan_layout_rejects_mixed_geometry_and_bad_layers() -> None:
    mixed = [tdesc((2, 9, 16, 8, 128), name="a"), tdesc((2, 9, 16, 4, 128), name="b")]
    with pytest.raises(LayoutError, match="mixed geometry"):
        plan_layout(mixed, {"kv_layout": "NHD"}, [])
    with pytest.raises(LayoutError, match="layer 1"):
        plan_layout([tdesc((2, 9, 16, 8, 128)), tdesc((9, 16))], {}, [])
    with pytest.raises(LayoutError, match="empty"):
        plan_layout(
            [
                TensorDesc(
                    "bfloat16", (2, 0, 16, 8, 128), contiguous_strides((2, 0, 16, 8, 128)), 0, "", 0
                )
            ],
            {},
            [],
        )
    with pytest.raises(LayoutError, match="no KV tensors"):
        plan_layout([], {}, [])


def test_layers_outside_the_group_may_be_anything() -> None:
    descs = [tdesc((2, 9, 16, 8, 128), name="a"), tdesc((9, 16), name="b")]
    lay = plan_layout(descs, {"kv_layout": "NHD"}, [group(layer_indices=[0])])
    assert lay.layers[1] is None and lay.layer_indices == (0,)
