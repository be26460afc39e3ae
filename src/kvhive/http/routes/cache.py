"""Cache control: /cache/clear, /cache/checksums (the reference's bench uses it), /cache/objects.

``/cache/objects`` lists and deletes stored objects.  The reference lists only L2; kvhive also
lists L1 (``tier=l1``).  L2 listing and deletion go through ``server.l2`` (the L2 layer);
without L2 adapters L2 requests answer 503.  Domain errors use ``{"detail": ...}``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from kvhive.errors import KvhiveError
from kvhive.http.deps import ServerDep
from kvhive.keys import ObjectKey, validate_salt
from kvhive.server.core import KvhiveServer

router = APIRouter(tags=["cache"])

MAX_DELETE_KEYS = 10_000
MAX_CHECKSUM_BLOCKS = 16_384
"""Block ids one ``POST /cache/checksums`` may name: it hashes every block's KV on the
server's CPU (100,000 ids took ~10 s); 16,384 covers a 256k-token prompt of 16-token
blocks."""
MAX_PAGE_START = 2**31  # a page_token decodes to a position in the listing


class ClearRequest(BaseModel):
    tier: str = "l1"
    force: bool = False


class ChecksumRequest(BaseModel):
    block_ids: list[int] = Field(max_length=MAX_CHECKSUM_BLOCKS)
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
        raise HTTPException(400, f"chunk_size must be positive (got {req.chunk_size})")
    compute = getattr(inst.mapping, "checksums", None)
    if compute is None:  # a CUDA registration: its pages are device memory
        raise HTTPException(
            400, f"instance {inst.instance_id}: checksums are served for cpu_shm registrations"
        )
    try:
        sums = compute(req.block_ids, req.chunk_size, req.layerwise)
    except KvhiveError as exc:  # a bad block range or a closed registration: the caller's error
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


# ---- /cache/objects -------------------------------------------------------------------------


U32 = 2**32 - 1


class EncodedKey(BaseModel):
    """One object key as ``GET /cache/objects`` lists it; out-of-range fields are 422s."""

    chunk_hash_hex: str = Field(pattern=r"^(?:[0-9a-fA-F]{2}){1,64}$")  # 1..64 bytes
    model_name: str = Field(max_length=4096)
    kv_rank: int = Field(ge=0, le=U32)  # packed world/rank bytes
    object_group_id: int = Field(0, ge=0, le=U32)
    cache_salt: str = ""


class DeleteRequest(BaseModel):
    keys: list[EncodedKey] = Field(max_length=MAX_DELETE_KEYS)  # refused before parsing all
    tier: Literal["l1", "l2", "all"] = "l2"
    force: bool = False
    adapter: str | None = None


def encode_key(key: ObjectKey) -> dict[str, Any]:
    return {
        "chunk_hash_hex": key.chunk_hash.hex(),
        "model_name": key.model_name,
        "kv_rank": key.kv_rank,
        "object_group_id": key.object_group_id,
        "cache_salt": key.cache_salt,
    }


def decode_key(i: int, k: EncodedKey) -> ObjectKey:
    try:
        return ObjectKey(
            bytes.fromhex(k.chunk_hash_hex),
            k.model_name,
            k.kv_rank,
            k.object_group_id,
            validate_salt(k.cache_salt),
        )
    except ValueError as exc:
        raise HTTPException(400, f"keys[{i}]: {exc}") from None


def _page_token(token: str | None) -> int:
    """The listing position a ``next_page_token`` encodes; 400 naming the field otherwise."""
    if not token:
        return 0
    try:
        start = int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(400, "page_token: not a token this server handed out") from None
    if not 0 <= start <= MAX_PAGE_START:
        raise HTTPException(400, "page_token: not a token this server handed out")
    return start


def _has_l2(server: Any) -> bool:
    l2 = getattr(server.config, "l2", None)
    return bool(l2 is not None and l2.adapters)


def _l2_adapter(server: Any, adapter: str | None) -> Any:
    if not _has_l2(server):
        raise HTTPException(503, "no L2 adapters are configured")
    try:
        return server.l2.find(adapter)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None


def _token(n: int | None) -> str | None:
    return None if n is None else base64.urlsafe_b64encode(str(n).encode()).decode()


@router.get("/cache/objects")
def list_objects(
    server: ServerDep,
    tier: str = "l2",
    adapter: str | None = None,
    model_name: str | None = None,
    page_size: int = Query(500, ge=1, le=5000),
    page_token: str | None = None,
) -> dict[str, Any]:
    """One page of stored objects: ``{"adapter", "shared", "entries": [{"key", "size_bytes"}],
    "next_page_token"}``.  ``tier`` is ``l2`` (reference, default) or ``l1`` (kvhive)."""
    if tier == "l1":
        start = _page_token(page_token)
        slots, total = server.l1.list_objects(start, page_size)
        entries = [
            {"key": encode_key(s.key), "size_bytes": s.nbytes}
            for s in slots
            if model_name is None or s.key.model_name == model_name
        ]
        end = start + len(slots)
        token = _token(end if end < total else None)
        return {"adapter": "l1", "shared": False, "entries": entries, "next_page_token": token}
    if tier not in ("l2", "all"):
        raise HTTPException(400, f"tier {tier!r} is not supported; use l1 or l2")
    _l2_adapter(server, adapter)  # 503 without L2, 404 for an unknown adapter
    found, items, nxt = server.l2.list_objects(
        adapter, model_name, _page_token(page_token), page_size
    )
    return {
        "adapter": found.spec.type,
        "shared": found.spec.shared,
        "entries": [{"key": encode_key(k), "size_bytes": n} for k, n in items],
        "next_page_token": _token(nxt),
    }


@router.delete("/cache/objects")
def delete_objects(req: DeleteRequest, server: ServerDep) -> dict[str, Any]:
    """Delete keys from L1 (locks respected unless ``force``: then what a copy still reads
    is removed at once but freed when the copy ends), L2 or both."""
    keys = [decode_key(i, k) for i, k in enumerate(req.keys)]
    out: dict[str, Any] = {"deleted": 0, "skipped": 0, "ok": True}
    if req.tier in ("l1", "all"):
        removed = server.l1.delete(keys, force=req.force)
        out["deleted"] += removed
        out["skipped"] += len(keys) - removed
    if req.tier == "l2" or (req.tier == "all" and _has_l2(server)):
        if req.adapter is not None:
            _l2_adapter(server, req.adapter)  # 404 for an unknown adapter
        elif not _has_l2(server):
            raise HTTPException(503, "no L2 adapters are configured")
        try:
            deleted, skipped = server.l2.delete_objects(keys, req.adapter)
        except Exception as exc:  # noqa: BLE001 - request boundary: any adapter failure is reported in the body
            out["ok"] = False
            out["error"] = f"L2 delete failed: {exc}"
        else:
            out["deleted"] += deleted
            out["skipped"] += skipped
    return out
