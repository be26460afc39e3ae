"""Run one scenario of 0.5.7 requests against a server; print one result line.

    <client057 python> drive.py SCENARIO --url tcp://127.0.0.1:PORT [--model M] [--timeout S]

Runs INSIDE the 0.5.7 client venv (``scripts/setup_client057_venv.sh``).  Every request is
sent by 0.5.7's own ``ZmqMultiprocessClient`` (``lmc057.py``); the result line is
``RESULT_MARK`` followed by ``{"version": ..., "steps": {name: {"ok", "value"|"error"}}}``,
which ``tests/interop057/conftest.py`` parses.  A scenario is a function
``(lmc, client, steps, args)`` registered in :data:`SCENARIOS`; add one per op family.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from typing import Any

import lmc057
import protocol057

RESULT_MARK = "@@KVHIVE_INTEROP057_RESULT@@ "

Scenario = Callable[[lmc057.Lmc057, Any, lmc057.Steps, argparse.Namespace], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def tokens(n: int, seed: int) -> list[int]:
    """``n`` token ids, distinct per ``seed``, some above 65535 (they need all 4 bytes)."""
    return [(seed * 1_000_003 + i * 7919) % 150_000 for i in range(n)]


@scenario
def basics(lmc: lmc057.Lmc057, client: Any, steps: lmc057.Steps, args: argparse.Namespace) -> None:
    """noop, get_chunk_size, then a lookup with a 0.5.7 key (``token_bytes``) of two chunks
    on an empty cache, its hit count (``query_prefetch_status``) and the session's end."""
    steps.call("noop", client.noop())
    chunk = steps.call("get_chunk_size", client.get_chunk_size()) or 256
    request_id = f"basics-{uuid.uuid4().hex[:8]}"
    key = lmc.key(args.model, tokens(2 * chunk, seed=1), request_id=request_id)
    steps.results["key_fields"] = {"ok": True, "value": sorted(lmc057.to_builtins(key))}
    steps.call("lookup", client.lookup(key, 1))
    if steps.results["lookup"]["ok"]:
        steps.poll("lookup_hits", lambda: client.query_prefetch_status(request_id))
    steps.call("end_session", client.end_session(request_id))


SCENARIOS.update(protocol057.SCENARIOS)  # the ops 0.5.7 changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="interop057/model")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--http-url", default="", help="the server's HTTP API (status checks)")
    args = p.parse_args(argv)
    lmc = lmc057.load()
    steps = lmc057.Steps(timeout_s=args.timeout)
    client = lmc.connect(args.url)
    try:
        SCENARIOS[args.scenario](lmc, client, steps, args)
    finally:
        client.close()
    result = {"version": lmc.version, "steps": steps.results}
    sys.stdout.write(RESULT_MARK + json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
