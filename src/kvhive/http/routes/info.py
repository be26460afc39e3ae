"""Information endpoints: /, /healthcheck, /version, /lmc_version, /commit_id, /status, /config.

Shapes follow the reference (spec §5.2); ``/healthcheck`` answers 503 with the reasons when a
component is unhealthy (a copy or L2 load past its deadline, a failed L1 self-check, a dead
event-bus dispatcher) instead of only checking that the engine object exists.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from kvhive import __version__
from kvhive.http.deps import ServerDep

router = APIRouter(tags=["info"])

COMMIT_ID = "NA"
"""The build's commit id (unknown in a source install, as the reference prints ``NA``)."""


@router.get("/")
def root() -> dict[str, str]:
    return {"status": "ok", "service": "kvhive HTTP API"}


@router.get("/healthcheck")
def healthcheck(server: ServerDep) -> JSONResponse:
    """``{"status": "healthy"}``; 200 ``{"status": "degraded", "reasons"}`` while an L2 tier
    does not answer (requests are still served: not a reason to restart or drain the node);
    503 ``{"status": "unhealthy", "reason", "reasons"}``."""
    healthy, reasons = server.health()
    if healthy:
        degraded = server.degraded()
        if degraded:
            return JSONResponse({"status": "degraded", "reasons": degraded})
        return JSONResponse({"status": "healthy"})
    body = {"status": "unhealthy", "reason": reasons[0], "reasons": reasons}
    return JSONResponse(body, status_code=503)


@router.get("/version")
def version() -> str:
    """``"<version>-<commit>"`` (``NA`` for an unknown part)."""
    return f"{__version__}-{COMMIT_ID}"


@router.get("/lmc_version")
def lmc_version() -> str:
    return __version__


@router.get("/commit_id")
def commit_id() -> str:
    return COMMIT_ID


@router.get("/status")
def status(server: ServerDep) -> dict[str, Any]:
    """kvhive's status plus the reference fields ``lmcache describe kvcache`` reads."""
    body = server.status()
    for key, value in reference_fields(server, body).items():
        body.setdefault(key, value)
    return body


def reference_fields(server: Any, body: dict[str, Any]) -> dict[str, Any]:
    """``storage_manager.l1_manager``, ``cache_context_meta`` etc. in the reference's names."""
    l1 = server.l1.stats()
    cfg = server.config
    manager = {
        "is_healthy": l1.healthy,
        "total_object_count": l1.objects + l1.staging_objects,
        "write_locked_count": l1.staging_objects,
        "read_locked_count": l1.read_locked_objects,
        "temporary_count": getattr(l1, "temporary_objects", 0),
        "staging_object_count": l1.staging_objects,
        "staging_bytes": l1.staging_bytes,
        "memory_used_bytes": l1.used_bytes,
        "memory_total_bytes": l1.heap_bytes,
        "memory_configured_bytes": l1.configured_bytes,
        "capacity_bytes_by_backend": {"dram": l1.configured_bytes},
        "memory_usage_ratio": l1.usage,
        "write_ttl_seconds": cfg.l1.write_ttl_seconds,
        "read_ttl_seconds": cfg.l1.read_ttl_seconds,
    }
    l2 = getattr(cfg, "l2", None)
    instances = server.registry.snapshot()
    return {
        "storage_manager": {
            "is_healthy": body.get("is_healthy", l1.healthy),
            "l1_manager": manager,
            "l1_managers": {"_default": manager},
            "eviction_controller": {"eviction_policy": cfg.eviction.policy},
            "num_l2_adapters": len(getattr(l2, "adapters", ()) or ()),
            "l1_usage": l1.usage,
            "l1_capacity_bytes_by_backend": {"dram": l1.configured_bytes},
        },
        "cache_context_meta": {
            str(i.instance_id): {
                "model_name": i.model_name,
                "world_size": i.world_size,
                "kv_cache_layout": i.layout,
            }
            for i in instances
            if i.mode == "lmcache_driven"
        },
        "registered_gpu_ids": [i.instance_id for i in instances if i.mode == "lmcache_driven"],
    }


@router.get("/config")
def config(server: ServerDep) -> Response:
    """Every configuration section as indented JSON (secrets masked)."""
    data = server.config.to_dict()
    data.setdefault("observability", {})["service_instance_id"] = server.obs.instance_id
    body = json.dumps(data, indent=2, default=str)
    return Response(body, media_type="application/json")
