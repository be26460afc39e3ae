"""A shared-prefix workload through the router, once per policy; JSON results on stdout.

Standard library only.  Each policy gets its own ``--prefixes`` random token-id prefixes of
``--prefix-tokens`` tokens (disjoint between policies, so neither warms the other), and
``--requests`` requests, each one prefix (seeded shuffle) plus a unique suffix, sent as
token ids (``prompt: [ids]``, greedy, ``stream: true``) ``--concurrency`` at a time.
Before each policy it sets the router's policy (``POST /router/config``), zeroes its
statistics, and clears every ``--kvhive`` server's L1 (``POST /cache/clear``).

Per policy it reports: requests with any cached prefix (``hit_requests``), the prefix
tokens served from cache (``vLLM usage.prompt_tokens_details.cached_tokens``; vLLM needs
``--enable-prompt-tokens-details``) over all prefix tokens (``prefix_hit_rate``), prefill
tokens saved, time to first token (median, p90), kvhive's counter deltas from ``/status``
and the router's ``/router/stats``.

    python workload.py --router http://10.0.0.1:8000 --kvhive http://10.0.0.2:8080 \\
        --kvhive http://10.0.0.3:8080 --prefixes 4 --requests 16 --concurrency 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

COUNTERS = ("lookup_chunks", "lookup_hit_chunks", "stored_chunks", "retrieved_chunks")


@dataclass(frozen=True, slots=True)
class Result:
    """One request: its prefix, where it went, TTFT, prompt and cached tokens."""

    prefix: int
    replica: str
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int


def http(url: str, body: Any = None, timeout_s: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def make_prompts(args: argparse.Namespace, salt: int) -> list[tuple[int, list[int]]]:
    """``(prefix index, token ids)`` for every request of one policy."""
    rng = random.Random(args.seed * 1000 + salt)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(args.prefix_tokens)]
                for _ in range(args.prefixes)]  # fmt: skip
    order = [i % args.prefixes for i in range(args.requests)]
    rng.shuffle(order)
    return [(p, prefixes[p] + [rng.randrange(1000, 40000) for _ in range(args.suffix_tokens)])
            for p in order]  # fmt: skip


def send(router: str, model: str, max_tokens: int, prefix: int, prompt: list[int]) -> Result:
    """One streamed completion; TTFT is the first streamed chunk's arrival."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(router + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    t0 = time.monotonic()
    ttft, usage = None, {}
    with urllib.request.urlopen(req, timeout=600) as resp:
        replica = resp.headers.get("x-kvrouter-replica", "?")
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if ttft is None and msg.get("choices"):
                ttft = time.monotonic() - t0
            usage = msg.get("usage") or usage
    total = time.monotonic() - t0
    details = usage.get("prompt_tokens_details") or {}
    return Result(prefix, replica, total if ttft is None else ttft, total,
                  int(usage.get("prompt_tokens", len(prompt))),
                  int(details.get("cached_tokens") or 0))  # fmt: skip


def counters(kvhive: list[str]) -> dict[str, int]:
    """kvhive's ``/status`` counters, summed over servers."""
    out = dict.fromkeys(COUNTERS, 0)
    for url in kvhive:
        got = http(url + "/status")["counters"]
        for k in COUNTERS:
            out[k] += int(got.get(k, 0))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_policy(args: argparse.Namespace, policy: str, salt: int) -> dict[str, Any]:
    http(args.router + "/router/config", {"policy": policy})
    http(args.router + "/router/reset", {})
    for url in args.kvhive:
        http(url + "/cache/clear", {"force": True})
    prompts = make_prompts(args, salt)
    before = counters(args.kvhive)
    t0 = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda pp: send(args.router, args.model, args.max_tokens, *pp),
                                prompts))  # fmt: skip
    wall = time.monotonic() - t0
    after = counters(args.kvhive)
    time.sleep(args.settle_s)  # events of the last requests
    stats = http(args.router + "/router/stats")
    prefix_total = args.prefix_tokens * len(results)
    cached = sum(r.cached_tokens for r in results)
    ttft = [r.ttft_s for r in results]
    return {
        "policy": policy,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "hit_requests": sum(r.cached_tokens > 0 for r in results),
        "prefix_hit_rate": round(cached / prefix_total, 4) if prefix_total else 0.0,
        "prefill_tokens_saved": cached,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "ttft_median_s": round(statistics.median(ttft), 4),
        "ttft_p90_s": round(pct(ttft, 0.9), 4),
        "kvhive": {k: after[k] - before[k] for k in COUNTERS},
        "by_replica": stats["by_replica"],
        "router": {
            k: stats[k]
            for k in (
                "by_reason",
                "matched_tokens_total",
                "predicted_tokens_total",
                "storage_tokens_total",
                "events",
                "events_by_source",
                "stale",
                "index",
                "subscriber",
            )
        },
        "results": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", required=True, help="the router's base URL")
    p.add_argument("--kvhive", action="append", default=[], help="a kvhive HTTP URL (repeat)")
    p.add_argument("--policies", default="round_robin,kv")
    p.add_argument("--model", default="smol")
    p.add_argument("--prefixes", type=int, default=4)
    p.add_argument("--prefix-tokens", type=int, default=1536)
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle-s", type=float, default=0.5)
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    a.router = a.router.rstrip("/")
    out = {"config": {k: v for k, v in vars(a).items() if k != "out"},
           "policies": [run_policy(a, pol, i) for i, pol in enumerate(a.policies.split(","))]}  # fmt: skip
    text = json.dumps(out, indent=1)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
