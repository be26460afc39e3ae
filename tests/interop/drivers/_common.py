"""Shared helpers for the interop driver scripts.

These scripts run INSIDE the lmcache 0.5.6 client venv (see
``scripts/setup_client_venv.sh``), never in kvhive's own venv: they import the
unmodified lmcache client classes and talk to a server started by the pytest
side. Each driver prints exactly one result line, ``RESULT_MARK`` followed by a
JSON object, which the pytest side parses and asserts on.

The drivers use most of this module, so they import it whole (``import _common as
common``) rather than each repeating a long list of names.

Nothing in here imports kvhive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# Never let the reference client phone home, keep its logs short.
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import torch
import zmq

RESULT_MARK = "@@KVHIVE_INTEROP_RESULT@@ "

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def driver_parser(model: str) -> argparse.ArgumentParser:
    """A parser with the arguments every driver takes: the server's URL and the model name
    (``model`` by default; the drivers keep their data apart by model name)."""
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", default=model)
    return p


def emit(result: dict[str, Any]) -> None:
    """Print the single machine-readable result line."""
    sys.stdout.write(RESULT_MARK + json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    """Progress line on stderr (the pytest side shows it on failure)."""
    sys.stderr.write(f"[driver {time.monotonic():.3f}] {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------
# Fake vLLM-side objects. The adapters only duck-type these: a KV cache config
# with ``kv_cache_groups``, each group with ``layer_names`` and a
# ``kv_cache_spec`` that has ``block_size`` (class names matter only for the
# sliding-window and Mamba specs, which these are not).
# --------------------------------------------------------------------------


@dataclass
class FullAttentionSpec:
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    prefix_cacheable: bool = True


@dataclass
class KVCacheGroupSpec:
    layer_names: list[str]
    kv_cache_spec: FullAttentionSpec


@dataclass
class KVCacheConfig:
    num_blocks: int
    kv_cache_groups: list[KVCacheGroupSpec] = field(default_factory=list)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int = 4
    num_kv_heads: int = 4
    head_size: int = 64
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def layer_names(shape: ModelShape) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers)]


def make_vllm_cpu_kv_caches(
    shape: ModelShape, num_blocks: int, block_size: int, storage: str = "per-layer"
) -> dict[str, torch.Tensor]:
    """Allocate zeroed KV caches in vLLM's CPU attention layout.

    vLLM's CPU backend allocates each layer as ``[2, NB, NH, BS, HS]`` (the
    "HND" layout). ``storage="per-layer"`` gives every layer its own storage
    (storage_offset 0); ``storage="shared"`` carves all layers out of one flat
    buffer, so every layer but the first has a non-zero storage offset.
    """
    per_layer = (2, num_blocks, shape.num_kv_heads, block_size, shape.head_size)
    numel = 1
    for d in per_layer:
        numel *= d
    names = layer_names(shape)
    if storage == "per-layer":
        return {n: torch.zeros(per_layer, dtype=shape.torch_dtype) for n in names}
    if storage == "shared":
        flat = torch.zeros(numel * len(names), dtype=shape.torch_dtype)
        return {n: flat[i * numel : (i + 1) * numel].view(per_layer) for i, n in enumerate(names)}
    raise ValueError(f"unknown storage variant {storage!r}")


def fake_kv_cache_config(shape: ModelShape, num_blocks: int, block_size: int) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size, shape.num_kv_heads, shape.head_size, shape.torch_dtype)
    return KVCacheConfig(num_blocks, [KVCacheGroupSpec(layer_names(shape), spec)])


def fill_blocks(kv_caches: dict[str, torch.Tensor], block_ids: list[int], seed: int) -> None:
    """Write deterministic random data into ``block_ids`` of every layer."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor(block_ids, dtype=torch.long)
    for t in kv_caches.values():
        sub = t[:, idx]
        data = torch.randn(sub.shape, generator=gen, dtype=torch.float32).to(t.dtype)
        t[:, idx] = data


def set_blocks(kv_caches: dict[str, torch.Tensor], block_ids: list[int], value: float) -> None:
    idx = torch.tensor(block_ids, dtype=torch.long)
    for t in kv_caches.values():
        t[:, idx] = value


def snapshot_blocks(kv_caches: dict[str, torch.Tensor], block_ids: list[int]) -> list[torch.Tensor]:
    """Copies of ``block_ids`` of every layer, as raw bytes ([2, n, NH, BS, HS*itemsize])."""
    idx = torch.tensor(block_ids, dtype=torch.long)
    return [t[:, idx].contiguous().view(torch.uint8).clone() for t in kv_caches.values()]


def bytes_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def tokens(seed: int, n: int, vocab: int = 50_000) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=gen).tolist()


# --------------------------------------------------------------------------
# A single-process "vLLM": one scheduler adapter plus one worker adapter, as
# LMCacheMPConnector builds them, with TP=PP=1 and one server.
# --------------------------------------------------------------------------


class VllmHarness:
    """Drive the lmcache 0.5.6 vLLM adapters the way LMCacheMPConnector does."""

    def __init__(
        self,
        url: str,
        model_name: str,
        block_size: int,
        mode: str,
        *,
        mq_timeout: float = 20.0,
        heartbeat_interval: float = 5.0,
        with_scheduler: bool = True,
        zmq_context: zmq.Context | None = None,
        enable_kv_events: bool = False,
    ) -> None:
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPSchedulerAdapter,
            LMCacheMPWorkerAdapter,
            ParallelStrategy,
        )

        self.url = url
        self.model_name = model_name
        self.block_size = block_size
        self.mq_timeout = mq_timeout
        self.ctx = zmq_context or zmq.Context()
        self._own_ctx = zmq_context is None
        strategy = ParallelStrategy(
            mla_only=False,
            vllm_world_size=1,
            vllm_worker_id=0,
            tp_size=1,
            pp_size=1,
            n_servers=1,
        )
        extra = {
            "lmcache.mp.mq_timeout": mq_timeout,
            "lmcache.mp.heartbeat_interval": heartbeat_interval,
            "lmcache.mp.mp_transfer_mode": mode,
        }
        self.scheduler = (
            LMCacheMPSchedulerAdapter(
                [url], self.ctx, model_name, block_size, strategy, extra_config=extra
            )
            if with_scheduler
            else None
        )
        self.worker = LMCacheMPWorkerAdapter(
            url,
            self.ctx,
            model_name,
            block_size,
            strategy,
            extra_config=extra,
            enable_kv_events=enable_kv_events,
        )
        self.chunk_size: int = self.worker.lmcache_tokens_per_chunk
        self.blocks_in_chunk: int = self.worker.blocks_in_chunk

    @property
    def instance_id(self) -> int:
        return self.worker.instance_id

    def register(
        self,
        kv_caches: dict[str, torch.Tensor],
        kv_cache_config: KVCacheConfig,
        layout_hints: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Register like LMCacheMPConnector.register_kv_caches (vLLM CPU: HND hint)."""
        from lmcache.integration.vllm.kv_cache_groups import create_engine_group_infos_from_vllm

        hints = {"kv_layout": "HND"} if layout_hints is None else layout_hints
        infos = create_engine_group_infos_from_vllm(kv_cache_config, kv_caches, layout_hints=hints)
        self.worker.register_kv_caches(kv_caches, engine_group_infos=infos, layout_hints=hints)
        return [
            {
                "engine_group_id": i.engine_group_id,
                "layer_indices": list(i.layer_indices),
                "tokens_per_block": i.tokens_per_block,
                "sw_size_tokens": i.sw_size_tokens,
            }
            for i in infos
        ]

    # -- scheduler side ---------------------------------------------------

    def lookup(self, request_id: str, token_ids: list[int], timeout: float = 15.0) -> int:
        """Submit a lookup and poll it to completion; returns hit tokens."""
        assert self.scheduler is not None
        self.scheduler.maybe_submit_lookup_request(request_id, token_ids)
        deadline = time.monotonic() + timeout
        while True:
            hit = self.scheduler.check_lookup_result(request_id)
            if hit is not None:
                return int(hit)
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookup {request_id} did not finish in {timeout}s")
            time.sleep(0.002)

    def free_lookup_locks(
        self, request_id: str, token_ids: list[int], start: int, end: int
    ) -> None:
        assert self.scheduler is not None
        self.scheduler.free_lookup_locks(token_ids, start, end, request_id)

    def end_session(self, request_id: str) -> None:
        assert self.scheduler is not None
        self.scheduler.end_session(request_id)
        self.scheduler.cleanup_lookup_result(request_id)

    # -- worker side -------------------------------------------------------

    def _op(self, token_ids: list[int], block_ids: list[int], start: int, end: int, skip: int = 0):
        from lmcache.integration.vllm.vllm_multi_process_adapter import LoadStoreOp

        return LoadStoreOp(
            token_ids=token_ids,
            block_ids=[list(block_ids)],
            start=start,
            end=end,
            skip_first_n_tokens=skip,
        )

    def store(
        self,
        request_id: str,
        token_ids: list[int],
        block_ids: list[int],
        start: int,
        end: int,
        timeout: float | None = None,
    ) -> bool:
        """One wait_for_save STORE entry; ``block_ids`` cover exactly [start, end)."""
        op = self._op(token_ids, block_ids, start, end)
        event = self.worker.create_recorded_event()
        self.worker.submit_store_request(request_id, op, event)
        fut = self.worker.store_futures.get(request_id)
        if fut is None:
            raise RuntimeError("store was dropped by the adapter (server unhealthy?)")
        ok = bool(fut.result(timeout=timeout or self.mq_timeout))
        # Let the adapter do its normal bookkeeping (engine says: finished).
        self.worker.get_finished({request_id})
        return ok

    def retrieve(
        self,
        request_id: str,
        token_ids: list[int],
        block_ids: list[int],
        start: int,
        end: int,
        skip: int = 0,
        timeout: float | None = None,
    ) -> tuple[bool, list[int]]:
        """One start_load_kv RETRIEVE entry; returns (ok, block ids flagged as load errors)."""
        op = self._op(token_ids, block_ids, start, end, skip)
        event = self.worker.create_recorded_event()
        self.worker.submit_retrieve_request(request_id, op, event)
        entry = self.worker.retrieve_futures.get(request_id)
        if entry is None:
            raise RuntimeError("retrieve was dropped by the adapter (server unhealthy?)")
        ok = bool(entry[0].result(timeout=timeout or self.mq_timeout))
        _, finished = self.worker.get_finished(set())
        assert finished is not None and request_id in finished, finished
        errors = sorted(self.worker.get_block_ids_with_load_errors())
        return ok, errors

    def shutdown(self, unregister: bool = True) -> None:
        if unregister:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self._own_ctx:
            self.ctx.destroy(linger=0)


def blocks_for(start_block: int, num_chunks: int, blocks_in_chunk: int) -> list[int]:
    return list(range(start_block, start_block + num_chunks * blocks_in_chunk))


def chunk_blocks(block_ids: list[int], chunk: int, blocks_in_chunk: int) -> list[int]:
    return block_ids[chunk * blocks_in_chunk : (chunk + 1) * blocks_in_chunk]


def src_dst_blocks(num_chunks: int, blocks_in_chunk: int) -> tuple[list[int], list[int]]:
    """``num_chunks`` chunks of source blocks from block 1 (block 0 is vLLM's null block and
    is never used), then as many destination blocks right after them."""
    src = blocks_for(1, num_chunks, blocks_in_chunk)
    return src, blocks_for(src[-1] + 1, num_chunks, blocks_in_chunk)


def register_cpu_kv(h: VllmHarness, shape: ModelShape, num_blocks: int) -> dict[str, torch.Tensor]:
    """Allocate ``num_blocks`` zeroed blocks of per-layer vLLM CPU KV cache and register them
    through ``h``'s worker adapter."""
    kv = make_vllm_cpu_kv_caches(shape, num_blocks, h.block_size)
    h.register(kv, fake_kv_cache_config(shape, num_blocks, h.block_size))
    return kv
