"""The reference's own harness, ``lmcache bench server --mode cpu``, against the target.

Each sequence runs lookup -> store (cold) and lookup -> retrieve (warm) plus
end_session. In lmcache-driven mode the bench checks the data through
``POST /cache/checksums`` on the HTTP port (block ids + chunk size in blocks +
instance id 1000); in engine-driven mode it hashes its own tensors.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

SEQUENCES = 3


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(l1_size_gb=0.5)


@pytest.mark.parametrize(("mode", "first_seq"), [("lmcache_driven", 0), ("engine_driven", 100)])
def test_bench_server_cpu(
    server, attach_server, attach_context, client_python, interop_env, tmp_path, mode, first_seq
):
    attach_server(server)
    out_json = tmp_path / "bench.json"
    argv = [
        str(Path(client_python).parent / "lmcache"),
        "bench",
        "server",
        "--mode",
        "cpu",
        "--transfer-mode",
        mode,
        "--rpc-url",
        server.rpc_url,
        "--url",
        server.http_url,
        "--kvcache-shape-spec",
        "(2,256,16,4,64):bfloat16:4",
        "--num-tokens",
        "1024",  # + 1 sequence token: 4 full chunks per request
        # Distinct sequences per mode, so the cold pass of one never hits the other's data.
        "--start",
        str(first_seq),
        "--end",
        str(first_seq + SEQUENCES),
        "--interval",
        "0.2",
        "--format",
        "json",
        "--output",
        str(out_json),
    ]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=180,
        env=interop_env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    text = f"$ {' '.join(argv)}\nrc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    attach_context("lmcache bench server output", lambda: text)
    assert proc.returncode == 0, text
    results = json.loads(out_json.read_text())["metrics"]["results"]
    assert results["total_requests"] == SEQUENCES, results
    assert results["checksum_fail"] == 0, results
    assert results["checksum_ok"] == SEQUENCES, results
    assert "CHECKSUM MISMATCH" not in proc.stdout
    assert server.alive()
