"""A KV-aware router for vLLM replicas: an OpenAI-compatible proxy that sends each request to
the replica holding its longest cached prefix, learned from the replicas' KV events.

Runs with any python that has ``aiohttp``, ``pyzmq`` and ``msgspec`` (the vLLM venv has all
three).  Every replica is ``NAME=URL`` plus any number of event endpoints (vLLM's own
``--kv-events-config`` publisher, kvhive's ``--kv-events-endpoint``, each with an optional
replay endpoint)::

    python router.py --port 8000 --policy kv \\
        --replica a=http://10.0.0.2:8000 --events a=tcp://10.0.0.2:5557,tcp://10.0.0.2:5558 \\
        --replica b=http://10.0.0.3:8000 --events b=tcp://10.0.0.3:5557,tcp://10.0.0.3:5558

HTTP: ``POST /v1/completions`` (streaming passed through), ``GET /v1/models``,
``GET /router/stats``, ``POST /router/config {"policy": "kv"|"round_robin"}``,
``POST /router/reset`` (zero the decision statistics).  A ``prompt`` given as token ids is
routed as is; a text prompt is tokenized by the first replica's ``/tokenize``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from route_events import Source, Subscriber
from route_index import KvIndex
from route_policy import POLICIES, Replica, Router

log = logging.getLogger("kvrouter")


def _tokens(prompt: Any) -> list[int] | None:
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        return _tokens(prompt[0])
    return None


class Proxy:
    """The aiohttp application around a :class:`Router`."""

    def __init__(self, router: Router, sub: Subscriber | None) -> None:
        self.router, self.sub = router, sub
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=64 << 20)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/router/stats", self.stats)
        self.app.router.add_post("/router/config", self.config)
        self.app.router.add_post("/router/reset", self.reset)
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)

    async def _start(self, _app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.session = aiohttp.ClientSession(timeout=timeout)

    async def _stop(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def _tokenize(self, body: dict[str, Any]) -> list[int]:
        assert self.session is not None
        url = self.router.replicas[0].url + "/tokenize"
        req = {"model": body.get("model"), "prompt": body.get("prompt")}
        async with self.session.post(url, json=req) as resp:
            return list((await resp.json()).get("tokens") or [])

    async def completions(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        raw = await request.read()
        body = json.loads(raw)
        tokens = _tokens(body.get("prompt"))
        if tokens is None and isinstance(body.get("prompt"), str):
            tokens = await self._tokenize(body)
        rep = self.router.choose(tokens or [])
        try:
            async with self.session.post(rep.url + "/v1/completions", data=raw,
                                         headers={"content-type": "application/json"}) as up:  # fmt: skip
                out = web.StreamResponse(status=up.status)
                out.content_type = up.content_type
                out.headers["x-kvrouter-replica"] = rep.name
                await out.prepare(request)
                async for chunk in up.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        finally:
            self.router.done(rep)

    async def models(self, _request: web.Request) -> web.Response:
        assert self.session is not None
        async with self.session.get(self.router.replicas[0].url + "/v1/models") as up:
            return web.Response(body=await up.read(), status=up.status,
                                content_type="application/json")  # fmt: skip

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.router.stats(self.sub.counters if self.sub else None))

    async def config(self, request: web.Request) -> web.Response:
        body = await request.json()
        policy = body.get("policy", self.router.policy)
        if policy not in POLICIES:
            return web.json_response({"error": f"policy must be one of {POLICIES}"}, status=400)
        with self.router.lock:
            self.router.policy = policy
        return web.json_response({"policy": policy})

    async def reset(self, _request: web.Request) -> web.Response:
        self.router.reset()
        return web.json_response({"status": "ok"})


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"--{what} {v!r}: expected NAME=VALUE")
        out[name] = rest
    return out


def parse_sources(events: list[str], topic: str) -> list[Source]:
    """``NAME=PUB[,REPLAY]`` (repeatable, several per replica) as :class:`Source` records."""
    out = []
    for name, spec in ((n, s) for v in events for n, s in _pairs([v], "events").items()):
        pub, _, replay = spec.partition(",")
        out.append(Source(name, pub, replay or None, topic))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replica", action="append", default=[], help="NAME=URL (repeatable)")
    p.add_argument("--events", action="append", default=[],
                   help="NAME=PUB_ENDPOINT[,REPLAY_ENDPOINT] (repeatable)")  # fmt: skip
    p.add_argument("--topic", default="", help="topic prefix to subscribe to")
    p.add_argument("--policy", choices=POLICIES, default="kv")
    p.add_argument("--block-size", type=int, action="append", default=[],
                   help="block sizes to predict with before events name them (e.g. 256)")  # fmt: skip
    p.add_argument("--predict-ttl", type=float, default=0.0,
                   help="count a routed request's blocks as held there for this many seconds")  # fmt: skip
    p.add_argument("--max-imbalance", type=int, default=4)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    reps = [Replica(n, u.rstrip("/")) for n, u in _pairs(a.replica, "replica").items()]
    if not reps:
        p.error("at least one --replica is required")
    sources = parse_sources(a.events, a.topic)
    unknown = {s.replica for s in sources} - {r.name for r in reps}
    if unknown:
        p.error(f"--events names unknown replicas: {sorted(unknown)}")
    index = KvIndex(block_sizes=set(a.block_size), predict_ttl_s=a.predict_ttl)
    router = Router(reps, policy=a.policy, max_imbalance=a.max_imbalance, index=index)
    sub = Subscriber(sources, router.on_batch, router.on_stale) if sources else None
    if sub is not None:
        sub.start()
    log.info("routing %s over %s, %d event sources", a.policy, [r.name for r in reps], len(sources))
    web.run_app(Proxy(router, sub).app, host=a.host, port=a.port, print=None,
                handle_signals=True)  # fmt: skip
    if sub is not None:
        sub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
