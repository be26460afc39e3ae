"""/metrics: the Prometheus text exposition of this server's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from kvhive.http.deps import ServerDep
from kvhive.observability.metrics import CONTENT_TYPE

router = APIRouter(tags=["observability"])


@router.get("/metrics", response_class=Response)
def metrics(server: ServerDep) -> Response:
    """Prometheus exposition (also served on --prometheus-port)."""
    return Response(server.obs.exposition(), media_type=CONTENT_TYPE)
