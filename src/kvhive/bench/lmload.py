"""Load through the real lmcache 0.5.6 client: ``drivers/lmcache_client.py`` run in the client
venv as subprocesses (one per engine), results in the same shape as :mod:`kvhive.bench.kvload`.
"""

from __future__ import annotations

import json
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from kvhive.bench.config import KVShape
from kvhive.bench.kvload import Progress, transfer_figures
from kvhive.bench.servers import subprocess_env

DRIVER = Path(__file__).resolve().parent / "drivers" / "lmcache_client.py"
TIMEOUT_S = 1800.0


class DriverError(RuntimeError):
    """A driver process failed; the message carries its stderr tail."""


def _shape_args(shape: KVShape) -> list[str]:
    return [
        "--layers", str(shape.layers),
        "--heads", str(shape.kv_heads),
        "--head-size", str(shape.head_size),
        "--dtype", shape.dtype,
    ]  # fmt: skip


def _parse(stdout: str, stderr: str, rc: int | None, argv: list[str]) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    if rc == 0 and lines:
        try:
            out = json.loads(lines[-1])
            if isinstance(out, dict):
                return out
        except ValueError:
            pass
    tail = "\n".join(stderr.strip().splitlines()[-25:])
    raise DriverError(f"lmcache client driver failed (rc={rc}): {' '.join(argv)}\n{tail}")


def run_transfer(
    client_python: str,
    url: str,
    shape: KVShape,
    *,
    mode: str = "lmcache_driven",
    chunks: int = 16,
    per_request: tuple[int, ...] = (1, 16),
    rounds: int = 3,
    engines: int = 1,
    block_size: int = 16,
    seed: int | None = None,
    model_name: str = "bench-model",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``engines`` driver processes at once (meeting at a file barrier before each timed
    phase); their request spans are pooled as in :func:`kvhive.bench.kvload.run_transfer`."""
    seed = random.getrandbits(30) if seed is None else seed
    with tempfile.TemporaryDirectory(prefix="kvhive-bench-barrier-") as barrier:
        procs = []
        for i in range(engines):
            argv = [
                client_python, str(DRIVER), "transfer",
                "--url", url, "--mode", mode, "--block-size", str(block_size),
                "--chunks", str(chunks), "--rounds", str(rounds),
                "--per-request", *[str(p) for p in per_request],
                "--engines", str(engines), "--index", str(i), "--barrier-dir", barrier,
                "--seed", str(seed), "--model", model_name, *_shape_args(shape),
            ]  # fmt: skip
            procs.append(
                (
                    argv,
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL,
                        text=True,
                        env=subprocess_env(),
                    ),
                )
            )
        results = []
        try:
            for argv, proc in procs:
                try:
                    out, err = proc.communicate(timeout=TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                results.append(_parse(out, err, proc.returncode, argv))
        finally:
            for _, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    chunk_bytes = int(results[0]["chunk_bytes"])
    ops: dict[str, dict[str, Any]] = {}
    for op in ("store", "retrieve"):
        ops[op] = {}
        for p in per_request:
            spans = [tuple(s) for r in results for s in r["spans"][op][str(p)]]
            ops[op][str(p)] = transfer_figures(spans, chunk_bytes, p, engines)
            ops[op][str(p)]["failures"] = sum(
                r.get("failures", {}).get(op, {}).get(str(p), 0) for r in results
            )
    summary = {
        "chunk_bytes": chunk_bytes,
        "engines": engines,
        "chunks": chunks,
        "ops": ops,
        "errors": [e for r in results for e in r.get("errors", [])],
    }
    if progress:
        parts = [f"{op} {p}/req {f['gbs']:.2f} GB/s" for op, d in ops.items() for p, f in d.items()]
        progress(f"{engines} engine(s): " + ", ".join(parts))
    return summary


def run_lookups(
    client_python: str,
    url: str,
    shape: KVShape,
    *,
    prefixes: tuple[int, ...] = (1, 64, 400),
    samples: int = 100,
    poll_s: float = 0.002,
    block_size: int = 16,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Lookup latency through the scheduler adapter: ``poll`` (sleep ``poll_s`` between
    checks, as vLLM's scheduler steps do) and ``tight`` (sleep 50 us)."""
    argv = [
        client_python, str(DRIVER), "lookup", "--url", url,
        "--block-size", str(block_size), "--samples", str(samples), "--poll-s", str(poll_s),
        "--prefixes", *[str(p) for p in prefixes],
        "--seed", str(random.getrandbits(30)), "--model", "bench-lookup-lmcache",
        *_shape_args(shape),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DriverError(f"lmcache lookup driver timed out: {' '.join(argv)}") from exc
    out = _parse(proc.stdout, proc.stderr, proc.returncode, argv)
    if progress:
        for kind in ("tight", "poll"):
            hit = out[kind]["hit"]
            progress(
                f"lookup via adapter ({kind}): hit p50 "
                + ", ".join(f"{n} chunks {v['p50_ms']:.3f} ms" for n, v in hit.items())
            )
    return out
