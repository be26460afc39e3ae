"""Cross-check PagedKV against the real lmcache 0.5.6 code (run with the torch venv).

Not a pytest module: ``test_transfer_reference.py`` runs it as
``PYTHONPATH=<kvhive src dir> <venv-probe>/bin/python ref_paged_probe.py`` (the probe venv
has no kvhive installed).

For every layout it builds KV tensors the way vLLM does, lets the real 0.5.6
client wrap them (``migrate_to_shm_and_wrap``: the exact descriptors a CPU
worker sends), builds the real server's ``CPUCacheContext`` from those
wrappers and compares, byte for byte:

* gather: the reference D2H block transfer vs ``PagedKV.gather``;
* scatter with skip: the reference H2D transfer vs ``PagedKV.scatter``;
* ``/cache/checksums``: the reference ``_compute_block_checksums`` vs
  ``PagedKV.checksums`` (aggregated and layerwise).

Prints one line per case and ``ALL OK`` at the end; exits non-zero on a mismatch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import ClassVar


class _AnyModule(types.ModuleType):
    __path__: ClassVar[list[str]] = []

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


class _StubCrypto(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The probe venv lacks the optional ``cryptography`` package lmcache imports."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "cryptography" or fullname.startswith("cryptography."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AnyModule(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubCrypto())

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lmcache import device_ops  # noqa: E402
from lmcache.lmcache_native import TransferDirection  # noqa: E402
from lmcache.v1.multiprocess.http_apis.cache_api import (  # noqa: E402
    _compute_block_checksums,
    _resolve_per_layer_block_axes,
)
from lmcache.v1.platform.base.ipc_wire import CpuShmIPCData  # noqa: E402
from lmcache.v1.platform.devices.cpu.cache_context import CPUCacheContext  # noqa: E402
from lmcache.v1.platform.devices.cpu.shm import (  # noqa: E402
    CpuShmTensorWrapper,
    migrate_to_shm_and_wrap,
)

from kvhive.transfer.descriptors import TensorDesc  # noqa: E402
from kvhive.transfer.paged import PagedKV  # noqa: E402

NB, BS, NH, HS, NL, CHUNK = 9, 4, 2, 3, 3, 8


def _rand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _cases():
    f = (2, NB, BS, NH, HS)
    yield "NHD flash-attn", [_rand(f, torch.bfloat16) for _ in range(NL)], {"kv_layout": "NHD"}
    # vLLM <= 0.25 HND: physical [2,NB,NH,BS,HS] registered as a permuted NHD view.
    phys = [_rand((2, NB, NH, BS, HS), torch.float16) for _ in range(NL)]
    yield "HND permuted", [p.permute(0, 1, 3, 2, 4) for p in phys], {"kv_layout": "HND"}
    fi = (NB, 2, BS, NH, HS)
    yield "flashinfer NHD", [_rand(fi, torch.float32) for _ in range(NL)], {"kv_layout": "NHD"}
    yield (
        "flashinfer HND",
        [_rand((NB, 2, NH, BS, HS), torch.bfloat16) for _ in range(NL)],
        {"kv_layout": "HND"},
    )
    yield "MLA", [_rand((NB, BS, 5), torch.bfloat16) for _ in range(NL)], {"kv_layout": "NHD"}
    yield "MLA fp8", [_rand((NB, BS, 7), torch.uint8) for _ in range(NL)], {}
    # vLLM >= 0.26 CPU backend: [NB, NH, BS, 2*HS], physically HND.
    cpu = [_rand((NB, NH, BS, 2 * HS), torch.bfloat16) for _ in range(NL)]
    yield "vLLM CPU fused HND", cpu, {"kv_layout": "HND"}
    yield "fused HND no hint", [_rand((NB, NH, BS, 2 * HS), torch.float16) for _ in range(NL)], {}
    physn = [_rand((NB, BS, NH, 2 * HS), torch.bfloat16) for _ in range(NL)]
    yield "fused NHD permuted", [p.permute(0, 2, 1, 3) for p in physn], {"kv_layout": "NHD"}
    pool = _rand((NL, 2, NB, BS, NH, HS), torch.bfloat16)
    yield "NHD sibling views", [pool[i] for i in range(NL)], {"kv_layout": "NHD"}
    pool2 = _rand((NL, NB, NH, BS, 2 * HS), torch.bfloat16)
    yield "fused HND siblings", [pool2[i] for i in range(NL)], {"kv_layout": "HND"}


def _ref_transfer(ctx, objs: list[torch.Tensor], ids: list[int], direction, skip_blocks: int):
    device_ops.multi_layer_block_kv_transfer(
        ctx.get_kernel_group_kv_pointers(0),
        [o.data_ptr() for o in objs],
        torch.tensor(ids, dtype=torch.long),
        ctx.device,
        direction,
        ctx.get_shape_desc(0),
        ctx.get_slots_per_chunk_in_sw(0),
        ctx.get_engine_kv_format(0),
        skip_blocks,
    )


def main() -> int:
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    failures = 0
    for name, tensors, hints in _cases():
        wrappers = [migrate_to_shm_and_wrap(t) for t in tensors]
        # Through the wire encoding, as the server receives them.
        wire = [
            msgspec.msgpack.decode(msgspec.msgpack.encode(w.to_wire()), type=CpuShmIPCData)
            for w in wrappers
        ]
        server_wrappers = [CpuShmTensorWrapper.from_wire(w) for w in wire]
        ctx = CPUCacheContext(server_wrappers, lmcache_tokens_per_chunk=CHUNK, layout_hints=hints)
        descs = [
            TensorDesc(
                str(w.dtype).removeprefix("torch."),
                w.shape,
                w.stride,
                w.storage_offset,
                w.shm_name,
                w.nbytes,
            )
            for w in wrappers
        ]
        kv = PagedKV.from_descriptors(descs, hints, [], CHUNK)
        shape, dtype = ctx.get_kv_buffer_shape(CHUNK, 0), ctx.kv_tensors[0].dtype
        ok = tuple(shape) == kv.object_shape and shape.numel() * dtype.itemsize == kv.object_nbytes
        engine = ctx.kv_tensors
        for trial in range(3):
            ids = [int(x) for x in rng.choice(NB, kv.blocks_per_chunk, replace=trial == 2)]
            ref = torch.zeros(shape, dtype=dtype)
            _ref_transfer(ctx, [ref], ids, TransferDirection.D2H, 0)
            mine = np.zeros(kv.object_nbytes, np.uint8)
            kv.gather(ids, mine)
            ok &= bytes(ref.view(torch.uint8).numpy().tobytes()) == mine.tobytes()
            # scatter: same object into fresh ids, skipping one block
            ids2 = [int(x) for x in rng.permutation(NB)[: kv.blocks_per_chunk]]
            before = [t.clone() for t in engine]
            _ref_transfer(ctx, [ref], ids2, TransferDirection.H2D, 1)
            after_ref = [t.clone() for t in engine]
            for t, b in zip(engine, before, strict=True):
                t.copy_(b)
            kv.scatter(mine, ids2, skip_tokens=BS + BS // 2)
            ok &= all(
                torch.equal(a.view(torch.uint8), t.view(torch.uint8))
                for a, t in zip(after_ref, engine, strict=True)
            )
        axes, err = _resolve_per_layer_block_axes(ctx.engine_kv_format_per_layer())
        blocks = [int(x) for x in rng.permutation(NB)[:7]]
        if axes is not None:
            for layerwise in (False, True):
                want = _compute_block_checksums(list(engine), blocks, axes, 3, layerwise)
                got = kv.checksums(blocks, 3, layerwise)
                ok &= want["chunk_checksums"] == got
            csum = "checksums match"
        else:
            csum = f"reference checksum unsupported ({err})"
        print(
            f"{'OK  ' if ok else 'FAIL'} {name}: {ctx.get_engine_kv_format(0).name} "
            f"desc0 shape={list(descs[0].shape)} stride={list(descs[0].stride)} "
            f"offset={descs[0].storage_offset} nbytes={descs[0].nbytes}; object {list(shape)}; {csum}"
        )
        failures += not ok
        kv.close()
        del ctx, engine
    print("ALL OK" if failures == 0 else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
