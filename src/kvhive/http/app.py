"""The HTTP admin app (FastAPI).  Routes are thin: they read or call the server."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from kvhive import __version__
from kvhive.server.core import KvhiveServer


class ClearRequest(BaseModel):
    tier: str = "l1"
    force: bool = False


class ChecksumRequest(BaseModel):
    block_ids: list[int]
    chunk_size: int = Field(gt=0, description="blocks per chunk")
    instance_id: int = 0
    layerwise: bool = False


def create_app(server: KvhiveServer) -> FastAPI:
    app = FastAPI(title="kvhive HTTP API", version=__version__)

    @app.get("/")
    def root() -> dict[str, str]:
        return {"status": "ok", "service": "kvhive HTTP API"}

    @app.get("/healthcheck")
    def healthcheck() -> JSONResponse:
        healthy = server.l1.stats().healthy
        if healthy:
            return JSONResponse({"status": "healthy"})
        return JSONResponse({"status": "unhealthy", "reason": "L1 allocator check failed"}, 503)

    @app.get("/version")
    def version() -> str:
        return f"{__version__}-NA"

    @app.get("/status")
    def status() -> dict[str, Any]:
        return server.status()

    @app.get("/config")
    def config() -> dict[str, Any]:
        return server.config.to_dict()

    @app.post("/cache/clear")
    def clear(req: ClearRequest | None = None) -> dict[str, Any]:
        req = req or ClearRequest()
        if req.tier != "l1":
            raise HTTPException(400, f"tier {req.tier!r} is not supported; only 'l1'")
        removed = server.l1.clear(force=req.force)
        return {"status": "ok", "cleared": {"tier": "l1"}, "removed_objects": removed}

    @app.post("/cache/checksums")
    def checksums(req: ChecksumRequest) -> dict[str, Any]:
        inst = _checksum_instance(server, req.instance_id)
        if not req.block_ids:
            raise HTTPException(400, "block_ids is empty")
        try:
            sums = inst.mapping.checksums(req.block_ids, req.chunk_size, req.layerwise)
        except Exception as exc:
            raise HTTPException(400, str(exc)) from None
        n_chunks = -(-len(req.block_ids) // req.chunk_size)
        return {
            "status": "success",
            "chunk_size": req.chunk_size,
            "num_chunks": n_chunks,
            "chunk_checksums": sums,
            "layerwise": req.layerwise,
            "block_id_ranges": compress_runs(req.block_ids),
        }

    return app


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
        raise HTTPException(
            404, f"no lmcache-driven KV cache registered for instance {instance_id}"
        )
    return instances[0]
