"""Cache control: /cache/clear and /cache/checksums (the reference's bench uses the latter)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from kvhive.http.deps import ServerDep
from kvhive.server.core import KvhiveServer

router = APIRouter()


class ClearRequest(BaseModel):
    tier: str = "l1"
    force: bool = False


class ChecksumRequest(BaseModel):
    block_ids: list[int]
    chunk_size: int = Field(description="blocks per chunk (> 0)")
    instance_id: int = 0
    layerwise: bool = False


@router.post("/cache/clear")
def clear(server: ServerDep, req: ClearRequest | None = None) -> dict[str, Any]:
    req = req or ClearRequest()
    if req.tier != "l1":
        raise HTTPException(400, f"tier {req.tier!r} is not supported; only 'l1'")
    removed = server.l1.clear(force=req.force)
    return {"status": "ok", "cleared": {"tier": "l1"}, "removed_objects": removed}


@router.post("/cache/checksums")
def checksums(req: ChecksumRequest, server: ServerDep) -> dict[str, Any]:
    inst = _checksum_instance(server, req.instance_id)
    if not req.block_ids:
        raise HTTPException(400, "block_ids is required")
    if req.chunk_size <= 0:
        raise HTTPException(400, "chunk_size must be positive")
    try:
        sums = inst.mapping.checksums(req.block_ids, req.chunk_size, req.layerwise)
    except Exception as exc:  # request boundary: a bad range is the caller's error
        raise HTTPException(400, str(exc)) from None
    return {
        "status": "success",
        "chunk_size": req.chunk_size,
        "num_chunks": -(-len(req.block_ids) // req.chunk_size),
        "chunk_checksums": sums,
        "layerwise": req.layerwise,
        "block_id_ranges": compress_runs(req.block_ids),
    }


def compress_runs(ids: list[int]) -> list[int | list[int]]:
    """Order-preserving: runs of 3+ consecutive ids become [first, last]."""
    out: list[int | list[int]] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        if j - i >= 2:
            out.append([ids[i], ids[j]])
        else:
            out.extend(ids[i : j + 1])
        i = j + 1
    return out


def _checksum_instance(server: KvhiveServer, instance_id: int) -> Any:
    mapped = [i for i in server.registry.snapshot() if i.mapping is not None]
    instances = [i for i in mapped if i.instance_id == instance_id]
    if not instances and instance_id == 0 and len(mapped) == 1:
        instances = mapped  # convenience: 0 names the only registered cache
    if not instances:
        raise HTTPException(404, f"instance_id {instance_id} not registered")
    return instances[0]
