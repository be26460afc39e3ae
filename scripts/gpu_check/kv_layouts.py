"""GPU KV caches in every layout the CPU path copies (torch; runs in the client venv).

The cases mirror the layouts of tests/unit/transfer/test_transfer_paged.py and the
reference probe (src/kvhive/transfer/layouts.py, protocol §16.1), allocated on a CUDA
device instead of a shared-memory segment: the lmcache client then wraps each layer as a
``cuda`` (or, with ``isolated_ipc``, ``cuda_raw``) IPC descriptor.

Each case knows the engine axis that indexes blocks in every layer's view, so filling,
snapshotting and comparing blocks is one generic ``index_select`` / ``index_copy_`` on
that axis, whatever the layout (strided and sibling views included: ``index_copy_`` on a
view writes through to the shared storage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class Geometry:
    """Model and cache sizes shared by every case."""

    num_layers: int = 4
    num_blocks: int = 100
    block_size: int = 16
    num_heads: int = 8
    head_size: int = 128
    mla_width: int = 576  # DeepSeek-style latent + rope


Builder = Callable[[Geometry, torch.dtype, torch.device], list[torch.Tensor]]


@dataclass(frozen=True, slots=True)
class LayoutCase:
    """One registration layout: how to allocate its layers and where their block axis is."""

    name: str
    kv_layout: str  # the layout hint vLLM would send ("NHD" / "HND")
    dtype: str
    block_axis: int
    build: Builder
    what: str

    def allocate(self, g: Geometry, device: torch.device) -> dict[str, torch.Tensor]:
        layers = self.build(g, DTYPES[self.dtype], device)
        return {f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(layers)}


def _each(shape: Callable[[Geometry], tuple[int, ...]]) -> Builder:
    def build(g: Geometry, dt: torch.dtype, dev: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(shape(g), dtype=dt, device=dev) for _ in range(g.num_layers)]

    return build


def _hnd_permuted(g: Geometry, dt: torch.dtype, dev: torch.device) -> list[torch.Tensor]:
    # physical [2, NB, NH, BS, HS] registered as the logical NHD view (vLLM <= 0.25, HND)
    phys = _each(lambda g: (2, g.num_blocks, g.num_heads, g.block_size, g.head_size))(g, dt, dev)
    return [p.permute(0, 1, 3, 2, 4) for p in phys]


def _shared_buffer(g: Geometry, dt: torch.dtype, dev: torch.device) -> list[torch.Tensor]:
    # one allocation, per-layer views at growing storage offsets (vLLM >= 0.32 style)
    shape = (2, g.num_blocks, g.block_size, g.num_heads, g.head_size)
    per = 2 * g.num_blocks * g.block_size * g.num_heads * g.head_size
    flat = torch.zeros(per * g.num_layers, dtype=dt, device=dev)
    return [flat[i * per : (i + 1) * per].view(shape) for i in range(g.num_layers)]


def _blocks_first(g: Geometry, dt: torch.dtype, dev: torch.device) -> list[torch.Tensor]:
    # cross-layer pool [NB, NL, 2, BS, NH, HS]; each layer a strided [NB, 2, BS, NH, HS] view
    pool = torch.zeros(
        (g.num_blocks, g.num_layers, 2, g.block_size, g.num_heads, g.head_size),
        dtype=dt,
        device=dev,
    )
    return [pool[:, i] for i in range(g.num_layers)]


CASES: tuple[LayoutCase, ...] = (
    LayoutCase(
        "nhd", "NHD", "bfloat16", 1,
        _each(lambda g: (2, g.num_blocks, g.block_size, g.num_heads, g.head_size)),
        "FlashAttention [2, NB, BS, NH, HS]",
    ),
    LayoutCase(
        "hnd", "HND", "float16", 1,
        _each(lambda g: (2, g.num_blocks, g.num_heads, g.block_size, g.head_size)),
        "HND [2, NB, NH, BS, HS]",
    ),
    LayoutCase(
        "hnd_permuted_view", "HND", "bfloat16", 1, _hnd_permuted,
        "physical HND registered as a permuted NHD view (non-contiguous)",
    ),
    LayoutCase(
        "flashinfer_nhd", "NHD", "float32", 0,
        _each(lambda g: (g.num_blocks, 2, g.block_size, g.num_heads, g.head_size)),
        "FlashInfer [NB, 2, BS, NH, HS]",
    ),
    LayoutCase(
        "flashinfer_hnd", "HND", "bfloat16", 0,
        _each(lambda g: (g.num_blocks, 2, g.num_heads, g.block_size, g.head_size)),
        "FlashInfer HND [NB, 2, NH, BS, HS]",
    ),
    LayoutCase(
        "mla", "NHD", "bfloat16", 0,
        _each(lambda g: (g.num_blocks, g.block_size, g.mla_width)),
        "MLA [NB, BS, 576]",
    ),
    LayoutCase(
        "fused_nhd", "NHD", "bfloat16", 0,
        _each(lambda g: (g.num_blocks, g.block_size, g.num_heads, 2 * g.head_size)),
        "fused K/V [NB, BS, NH, 2*HS]",
    ),
    LayoutCase(
        "fused_hnd", "HND", "bfloat16", 0,
        _each(lambda g: (g.num_blocks, g.num_heads, g.block_size, 2 * g.head_size)),
        "fused K/V HND [NB, NH, BS, 2*HS]",
    ),
    LayoutCase(
        "shared_buffer", "NHD", "bfloat16", 1, _shared_buffer,
        "all layers carved from one allocation (storage offsets > 0)",
    ),
    LayoutCase(
        "blocks_first", "NHD", "bfloat16", 0, _blocks_first,
        "cross-layer pool [NB, NL, 2, BS, NH, HS], per-layer strided views",
    ),
)  # fmt: skip

CASE_NAMES = tuple(c.name for c in CASES)


def case_by_name(name: str) -> LayoutCase:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"unknown layout case {name!r} (known: {', '.join(CASE_NAMES)})")


def fill_blocks(kv: dict[str, torch.Tensor], axis: int, ids: list[int], seed: int) -> None:
    """Random bytes into blocks ``ids`` of every layer (enqueued on the current stream)."""
    gen = torch.Generator(device=next(iter(kv.values())).device).manual_seed(seed)
    idx = torch.tensor(ids, dtype=torch.long, device=next(iter(kv.values())).device)
    for t in kv.values():
        shape = list(t.shape)
        shape[axis] = len(ids)
        nbytes = t.element_size()
        for d in shape:
            nbytes *= d
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen, device=t.device)
        data = raw.view(t.dtype).view(shape)
        t.index_copy_(axis, idx, data)


def snapshot_blocks(kv: dict[str, torch.Tensor], axis: int, ids: list[int]) -> list[torch.Tensor]:
    """Byte copies of blocks ``ids`` of every layer (on the device, stream-ordered)."""
    idx = torch.tensor(ids, dtype=torch.long, device=next(iter(kv.values())).device)
    return [t.index_select(axis, idx).contiguous().view(torch.uint8).clone() for t in kv.values()]


def first_mismatch(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    """'' when every layer's bytes are equal, else where they first differ."""
    if len(a) != len(b):
        return f"{len(a)} layers vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            return f"layer {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        ne = (x != y).flatten().nonzero()
        if ne.numel():
            return (
                f"layer {i}: {ne.numel()} of {x.numel()} bytes differ, first at byte {int(ne[0])}"
            )
    return ""
