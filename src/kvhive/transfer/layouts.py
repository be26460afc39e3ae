"""Engine KV layouts: detect the per-layer format and map it to the chunk object.

Detection follows the reference's vLLM rules (protocol §16.1) on the view's
shape **after** re-ordering its dimensions into memory order (the 0.5.6
client already sends memory-order views; re-normalising here is a no-op for
them and makes hand-written descriptors behave the same way):

    rank 5, shape[0] == 2   NHD  [2, NB, BS, NH, HS]     FlashAttention
                            HND  [2, NB, NH, BS, HS]     kv_layout HND/BLHNC
    rank 5, shape[1] == 2   FLASHINFER_NHD [NB, 2, BS, NH, HS]
                            FLASHINFER_HND [NB, 2, NH, BS, HS]
    rank 4                  FUSED_NHD [NB, BS, NH, 2*HS]  (K/V packed per head)
                            FUSED_HND [NB, NH, BS, 2*HS]  vLLM >= 0.26 CPU backend
    rank 3                  MLA  [NB, BS, HS]             one latent plane

Every format is addressed through five canonical axes ``(kv, block, slot,
head, dim)``; the chunk object of one chunk is (§16.2)::

    object[kv, layer, t, h * HS + d] = engine[layer][kv, block(t), t % BS, h, d]
    shape  [kv_size, num_layers, chunk_tokens, num_heads * head_size]

with ``kv_size`` 1 for MLA (NH = 1) and for fused K/V (HS = 2 * head_size,
K and V interleaved per head exactly as the engine stores them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kvhive.errors import LayoutError
from kvhive.transfer.descriptors import TensorDesc

KV_LAYOUT_NAMES = ("NHD", "HND", "BLHNC", "BLNHC")
_HEADS_FIRST = ("HND", "BLHNC")
# What the reference assumes when a registration carries no kv_layout hint:
# HND on a CPU server (vLLM's CPU attention backend), NHD on a GPU server.
DEFAULT_KV_LAYOUT = "HND"


class KVFormat(str, Enum):
    """Per-layer engine tensor formats kvhive can copy (value = reference enum name)."""

    NHD = "NL_X_TWO_NB_BS_NH_HS"
    HND = "NL_X_TWO_NB_NH_BS_HS"
    FLASHINFER_NHD = "NL_X_NB_TWO_BS_NH_HS"
    FLASHINFER_HND = "NL_X_NB_TWO_NH_BS_HS"
    MLA = "NL_X_NB_BS_HS"
    FUSED_NHD = "NL_X_NB_BS_NH_CS"
    FUSED_HND = "NL_X_NB_NH_BS_CS"


# Engine axis of each canonical axis (kv, block, slot, head, dim); None = absent.
_AXES: dict[KVFormat, tuple[int | None, int, int, int | None, int]] = {
    KVFormat.NHD: (0, 1, 2, 3, 4),
    KVFormat.HND: (0, 1, 3, 2, 4),
    KVFormat.FLASHINFER_NHD: (1, 0, 2, 3, 4),
    KVFormat.FLASHINFER_HND: (1, 0, 3, 2, 4),
    KVFormat.MLA: (None, 0, 1, None, 2),
    KVFormat.FUSED_NHD: (None, 0, 1, 2, 3),
    KVFormat.FUSED_HND: (None, 0, 2, 1, 3),
}

# Block axis used by /cache/checksums.  The reference only lists the
# split-K/V and MLA formats; fused K/V is answered too (axis 0) instead of 501.
_CHECKSUM_BLOCK_AXIS: dict[KVFormat, int] = {
    KVFormat.NHD: 1,
    KVFormat.HND: 1,
    KVFormat.FLASHINFER_NHD: 0,
    KVFormat.FLASHINFER_HND: 0,
    KVFormat.MLA: 0,
    KVFormat.FUSED_NHD: 0,
    KVFormat.FUSED_HND: 0,
}

_DSA_INDEXER_WIDTH = 132  # fp8 DSA indexer rows: 128 values + one fp32 scale


def _is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """torch's rule: size-1 dimensions may carry any stride."""
    if math.prod(shape) == 0:
        return True
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1:
            if s != expected:
                return False
            expected *= n
    return True


def normalize_view(
    shape: Sequence[int], stride: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Re-order dimensions into memory order, as the reference does before detection.

    Dimensions are sorted by stride, outermost first; a size-1 dimension that
    ties on stride goes innermost among the tied ones.  A view that is then
    contiguous is re-shaped to the tightest shape its strides imply (that is
    what moves a singleton axis); anything else keeps the permuted dims.
    """
    if math.prod(shape) == 0:  # nothing to re-order; keep the engine's dims
        return tuple(shape), tuple(stride)
    order = sorted(range(len(shape)), key=lambda i: (stride[i], shape[i] != 1), reverse=True)
    p_shape = tuple(shape[i] for i in order)
    p_stride = tuple(stride[i] for i in order)
    numel = math.prod(p_shape)
    if not p_shape or 0 in p_stride or not _is_contiguous(p_shape, p_stride):
        return p_shape, p_stride
    tight = [numel // p_stride[0]] + [
        p_stride[i] // p_stride[i + 1] for i in range(len(p_stride) - 1)
    ]
    if math.prod(tight) != numel:
        return p_shape, p_stride
    strides = []
    acc = 1
    for n in reversed(tight):
        strides.append(acc)
        acc *= n
    return tuple(tight), tuple(reversed(strides))


def resolve_kv_layout(
    layout_hints: Mapping[str, Any] | None, default: str = DEFAULT_KV_LAYOUT
) -> str:
    """The ``kv_layout`` hint, validated; ``default`` when absent."""
    kv_layout = (layout_hints or {}).get("kv_layout")
    if kv_layout is None:
        return default
    if kv_layout not in KV_LAYOUT_NAMES:
        raise LayoutError(
            f"kv_layout hint {kv_layout!r} is not supported; expected one of "
            f"{', '.join(KV_LAYOUT_NAMES)}"
        )
    return kv_layout


def detect_format(shape: Sequence[int], kv_layout: str, dtype: str) -> KVFormat:
    """The format of a memory-order view of rank/shape ``shape`` (see module doc)."""
    heads_first = kv_layout in _HEADS_FIRST
    rank = len(shape)
    if rank == 4:
        head_axis = 1 if heads_first else 2
        if dtype == "uint8" and shape[-1] == _DSA_INDEXER_WIDTH and shape[head_axis] == 1:
            raise LayoutError("the DSA indexer cache layout is not supported")
        return KVFormat.FUSED_HND if heads_first else KVFormat.FUSED_NHD
    if rank == 6 and shape[0] == 2 and shape[3] == 1:
        raise LayoutError("the vLLM-RBLN KV layout [2, NB, NH, 1, BS, HS] is not supported")
    if rank == 5:
        if shape[0] == 2:
            return KVFormat.HND if heads_first else KVFormat.NHD
        if shape[1] == 2:
            return KVFormat.FLASHINFER_HND if heads_first else KVFormat.FLASHINFER_NHD
    if rank == 3:
        if dtype == "uint8" and shape[-1] == _DSA_INDEXER_WIDTH:
            raise LayoutError("the DSA indexer cache layout is not supported")
        return KVFormat.MLA
    raise LayoutError(f"unrecognised KV tensor shape {list(shape)} (kv_layout {kv_layout})")


@dataclass(frozen=True, slots=True)
class LayerView:
    """One registered layer: its descriptor, memory-order view and canonical axes.

    ``shape``/``stride`` are the normalised engine view (elements).  The
    canonical sizes and strides address element ``[kv, block, slot, head, dim]``
    at ``offset + kv*s_kv + block*s_block + slot*s_slot + head*s_head + dim*s_dim``.
    """

    desc: TensorDesc
    fmt: KVFormat
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    sizes: tuple[int, int, int, int, int]  # kv_size, NB, BS, NH, HS
    strides: tuple[int, int, int, int, int]

    @property
    def kv_size(self) -> int:
        return self.sizes[0]

    @property
    def num_blocks(self) -> int:
        return self.sizes[1]

    @property
    def block_size(self) -> int:
        return self.sizes[2]

    @property
    def num_heads(self) -> int:
        return self.sizes[3]

    @property
    def head_size(self) -> int:
        return self.sizes[4]

    @property
    def offset(self) -> int:
        return self.desc.storage_offset

    @property
    def checksum_axis(self) -> int:
        """Axis of the normalised view along which /cache/checksums selects blocks."""
        return _CHECKSUM_BLOCK_AXIS[self.fmt]

    @classmethod
    def build(cls, desc: TensorDesc, kv_layout: str) -> LayerView:
        shape, stride = normalize_view(desc.shape, desc.stride)
        fmt = detect_format(shape, kv_layout, desc.dtype)
        sizes = []
        strides = []
        for axis in _AXES[fmt]:
            sizes.append(1 if axis is None else shape[axis])
            strides.append(0 if axis is None else stride[axis])
        return cls(desc, fmt, shape, stride, tuple(sizes), tuple(strides))  # type: ignore[arg-type]


def _field(info: Any, name: str, default: Any) -> Any:
    if isinstance(info, Mapping):
        return info.get(name, default)
    return getattr(info, name, default)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """A registration's layout: every layer's view plus the transferred group.

    ``layer_indices`` are the registered layers copied into objects, in object
    order; ``layers`` holds a view for every registered descriptor (``None``
    where detection failed for a layer outside the group).
    """

    layers: tuple[LayerView | None, ...]
    layer_indices: tuple[int, ...]
    kv_layout: str

    @property
    def first(self) -> LayerView:
        view = self.layers[self.layer_indices[0]]
        assert view is not None
        return view

    @property
    def fmt(self) -> KVFormat:
        return self.first.fmt

    @property
    def dtype(self) -> str:
        return self.first.desc.dtype

    @property
    def itemsize(self) -> int:
        return self.first.desc.itemsize

    @property
    def kv_size(self) -> int:
        return self.first.kv_size

    @property
    def num_blocks(self) -> int:
        return self.first.num_blocks

    @property
    def block_size(self) -> int:
        return self.first.block_size

    @property
    def num_heads(self) -> int:
        return self.first.num_heads

    @property
    def head_size(self) -> int:
        return self.first.head_size

    @property
    def hidden(self) -> int:
        """Elements per token per plane and layer: ``num_heads * head_size``."""
        return self.num_heads * self.head_size

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    def object_shape(self, chunk_tokens: int) -> tuple[int, int, int, int]:
        """``[kv_size, num_layers, chunk_tokens, hidden]`` of one chunk object."""
        return (self.kv_size, self.num_layers, chunk_tokens, self.hidden)


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """What every copy backend derives from a layout and the server's chunk size: checked
    once here, so PagedKV (numpy on shared memory) and TorchPagedKV (torch, CUDA) agree.

    ``object_shape`` is ``(kv_size, num_layers, chunk_size, hidden)`` of one chunk object,
    ``blocks_per_chunk`` = chunk_size / block_size (B)."""

    kv_format: KVFormat
    dtype: str
    block_size: int
    num_blocks: int
    chunk_size: int
    blocks_per_chunk: int
    object_shape: tuple[int, ...]
    object_nbytes: int

    @classmethod
    def of(cls, layout: KVLayout, chunk_size: int) -> ChunkPlan:
        """Raises LayoutError for a chunk size that is not a positive multiple of the
        layout's block size."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise LayoutError(f"chunk size must be a positive integer, got {chunk_size!r}")
        if chunk_size % layout.block_size:
            raise LayoutError(
                f"chunk size {chunk_size} is not a multiple of the block size {layout.block_size}"
            )
        shape = layout.object_shape(chunk_size)
        return cls(
            kv_format=layout.fmt,
            dtype=layout.dtype,
            block_size=layout.block_size,
            num_blocks=layout.num_blocks,
            chunk_size=chunk_size,
            blocks_per_chunk=chunk_size // layout.block_size,
            object_shape=shape,
            object_nbytes=math.prod(shape) * layout.itemsize,
        )


def _group_layers(group_infos: Sequence[Any], num_layers: int) -> tuple[int, ...] | None:
    """Validate the engine group list; the layers of the one group (None = all)."""
    if not group_infos:
        return None
    if len(group_infos) > 1:
        raise LayoutError(
            f"{len(group_infos)} KV cache groups registered (hybrid model); kvhive "
            "supports one full-attention group"
        )
    info = group_infos[0]
    if _field(info, "engine_group_id", 0) != 0:
        raise LayoutError("the single KV group must have engine_group_id 0")
    sw = _field(info, "sw_size_tokens", -1)
    if sw is not None and sw >= 0:
        raise LayoutError(f"sliding-window KV groups (window {sw} tokens) are not supported")
    if _field(info, "recurrent_state", False):
        raise LayoutError("recurrent-state (Mamba) KV groups are not supported")
    if _field(info, "extra_object_group_tag", 0):
        raise LayoutError("extra object groups are not supported")
    indices = _field(info, "layer_indices", ()) or ()
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise LayoutError(f"group layer index {i!r} outside 0..{num_layers - 1}")
        out.append(int(i))
    if len(set(out)) != len(out):
        raise LayoutError("duplicate layer indices in the KV group")
    # The reference orders a kernel group's layers by registration index.
    return tuple(sorted(out)) or None


def plan_layout(
    descs: Sequence[TensorDesc],
    layout_hints: Mapping[str, Any] | None,
    group_infos: Sequence[Any] = (),
    *,
    default_kv_layout: str = DEFAULT_KV_LAYOUT,
) -> KVLayout:
    """Detect every layer's format and check the transferred layers agree.

    ``group_infos`` are the decoded vLLM ``EngineGroupInfo`` entries (maps or
    objects with ``engine_group_id``, ``layer_indices``, ``tokens_per_block``,
    ``sw_size_tokens``, ``extra_object_group_tag``, ``recurrent_state``).
    Raises LayoutError for anything but one full-attention group.
    """
    if not descs:
        raise LayoutError("no KV tensors registered")
    kv_layout = resolve_kv_layout(layout_hints, default_kv_layout)
    group = _group_layers(group_infos, len(descs))
    indices = group if group is not None else tuple(range(len(descs)))
    views: list[LayerView | None] = []
    for i, desc in enumerate(descs):
        try:
            views.append(LayerView.build(desc, kv_layout))
        except LayoutError as exc:
            if i in indices:
                raise LayoutError(f"layer {i}: {exc}") from None
            views.append(None)  # outside the group: never copied
    first = views[indices[0]]
    assert first is not None
    for i in indices:
        v = views[i]
        assert v is not None
        if v.desc.numel == 0:
            raise LayoutError(f"layer {i} has an empty KV tensor")
        if (v.fmt, v.sizes, v.desc.dtype) != (first.fmt, first.sizes, first.desc.dtype):
            raise LayoutError(
                f"layer {i} ({v.fmt.name} {list(v.shape)} {v.desc.dtype}) differs from layer "
                f"{indices[0]} ({first.fmt.name} {list(first.shape)} {first.desc.dtype}); "
                "KV groups with mixed geometry are not supported"
            )
    if group_infos:
        tpb = _field(group_infos[0], "tokens_per_block", 0) or 0
        if tpb and tpb != first.block_size:
            raise LayoutError(
                f"group tokens_per_block {tpb} differs from the tensors' block size "
                f"{first.block_size} (compressed KV caches are not supported)"
            )
    return KVLayout(tuple(views), tuple(indices), kv_layout)
