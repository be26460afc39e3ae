"""The status page: ``/dashboard`` (static HTML/JS, no build step) and its JSON feed.

``GET /dashboard/data`` is one snapshot of what the page draws: L1 usage and objects, lookup
tokens served per tier (the page turns successive snapshots into hit rates over time), L2
adapters with their in-flight queues and failures, registered engines, the event bus and
health.  ``lookup_history`` holds per-second buckets ``[unix second, requested, l1 hit, l2
hit]`` (tokens, last 5 minutes) from which the page draws hit rates per tier over time.  The
page polls every second.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from kvhive import __version__
from kvhive.http.deps import ServerDep

router = APIRouter(tags=["dashboard"])

_ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def _static(name: str) -> bytes:
    return (resources.files("kvhive.http") / "static" / name).read_bytes()


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse(_static("index.html"))


@router.get("/dashboard/", include_in_schema=False)
def page_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard/static/{name}", include_in_schema=False)
def asset(name: str) -> Response:
    media = _ASSETS.get(name)
    if media is None:
        raise HTTPException(404, "no such asset")
    return Response(_static(name), media_type=media, headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/data")
def data(server: ServerDep) -> dict[str, Any]:
    """A snapshot for the dashboard (cumulative counters; the page derives rates)."""
    l1 = server.l1.stats().to_dict()
    healthy, reasons = server.health()
    counters = dict(server.engine.counters)
    chunk = server.config.mp.chunk_size
    sub = server.obs.metrics
    tokens = {
        "requested": counters.get("lookup_chunks", 0) * chunk,
        "hit": counters.get("lookup_hit_chunks", 0) * chunk,
        "l1": 0,
        "l2": 0,
    }
    history: list[list[int]] = []
    if sub is not None:
        split = dict(sub.lookup_tokens)
        tokens["l1"], tokens["l2"] = split["l1"], split["l2"]
        history = [list(b) for b in list(sub.lookup_history)]
    else:
        tokens["l1"] = tokens["hit"]
    return {
        "time": time.time(),
        "version": __version__,
        "service_instance_id": server.obs.instance_id,
        "uptime_seconds": round(time.time() - server.started_at, 1),
        "healthy": healthy,
        "unhealthy_reasons": reasons,
        "l1": l1,
        "lookup_tokens": tokens,
        "lookup_history": history,
        "counters": counters,
        "l2_adapters": _l2_adapters(server, sub),
        "engines": [
            {"instance_id": str(i.instance_id), **i.describe()} for i in server.registry.snapshot()
        ],
        "active_sessions": len(server.engine.sessions),
        "inflight_copies": len(server.inflight),
        "event_bus": server.obs.bus.stats(),
        "requests": server.dispatcher.stats()["requests"],
    }


def _l2_adapters(server: Any, sub: Any) -> list[dict[str, Any]]:
    l2 = getattr(server.config, "l2", None)
    specs = list(getattr(l2, "specs", ()) or ())
    stores: dict[int, int] = {}
    loads: dict[int, int] = {}
    loaded: dict[int, int] = {}
    failures: dict[str, float] = {}
    if sub is not None:
        for adapter_index, _task in list(sub.inflight_stores):
            stores[adapter_index] = stores.get(adapter_index, 0) + 1
        for _req, adapter_index in list(sub.inflight_loads):
            loads[adapter_index] = loads.get(adapter_index, 0) + 1
        for (index, _name), n in list(sub.l2_loaded_by_adapter.items()):
            loaded[int(index)] = n
        for metric in sub.l2_failures.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    name = sample.labels["l2_name"]
                    failures[name] = failures.get(name, 0) + sample.value
    return [
        {
            "index": spec.index,
            "type": spec.type,
            "inflight_stores": stores.get(spec.index, 0),
            "inflight_loads": loads.get(spec.index, 0),
            "loaded_chunks": loaded.get(spec.index, 0),
            "failures": int(failures.get(spec.type, 0)),
        }
        for spec in specs
    ]
