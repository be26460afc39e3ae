"""Run the seed's "full example" command line, verbatim, and exercise it with the real lmcache
client.  Started by test_interop_seed_example.py inside a private network namespace (so the
example's fixed ports 6555, 8080, 9090 and 4317 are free and ``--host 0.0.0.0`` binds only
there); only the two paths are pointed at ``--workdir``.

Usage (as root): ``unshare -n -- sh -c 'ip link set lo up && exec python seed_example_run.py
--workdir DIR --client-python PY'``.  Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ (support.*), as pytest's rootdir conftest does

from support.otlp import otlp_receiver  # noqa: E402

# The seed's full example (mp-server-config-reference, "完整示例"), character for character.
SEED_EXAMPLE = r"""
lmcache server \
    --host 0.0.0.0 \
    --port 6555 \
    --chunk-size 512 \
    --max-workers 4 \
    --max-gpu-workers 2 \
    --hash-algorithm blake3 \
    --engine-type default \
    --lookup-hash-log-dir /data/lmcache/lookup_hashes \
    --lookup-hash-log-rotation-interval 21600 \
    --lookup-hash-log-rotation-max-size 104857600 \
    --lookup-hash-log-max-files 100 \
    --l1-size-gb 100 \
    --l1-use-lazy \
    --l1-init-size-gb 20 \
    --l1-align-bytes 4096 \
    --l1-write-ttl-seconds 600 \
    --l1-read-ttl-seconds 300 \
    --eviction-policy noop \
    --l2-store-policy skip_l1 \
    --eviction-trigger-watermark 0.9 \
    --eviction-ratio 0.1 \
    --l2-prefetch-policy default \
    --l2-prefetch-max-in-flight 8 \
    --l2-adapter '{"type": "nixl_store", "backend": "POSIX", "backend_params": {"file_path": "/data/lmcache/l2", "use_direct_io": "false"}, "pool_size": 64}' \
    --prometheus-port 9090 \
    --metrics-sample-rate 0.01 \
    --enable-tracing \
    --otlp-endpoint http://localhost:4317
"""
PATHS = {"/data/lmcache/lookup_hashes": "lookup_hashes", "/data/lmcache/l2": "l2"}
# The client's KV shape: 1 layer x 1 KV head x 32, bf16 -> 64 KiB per 512-token chunk, so two
# chunks (17 pages each with the trailer) fit the example's pool of 64 pages of 4 KiB
# (file_size defaults to the alignment, as in the reference).
CLIENT_SHAPE = ["--layers", "1", "--kv-heads", "1", "--head-size", "32"]
CHUNKS = 2


def server_argv(workdir: Path) -> list[str]:
    text = SEED_EXAMPLE
    for old, new in PATHS.items():
        text = text.replace(old, str(workdir / new))
    args = shlex.split(text.replace("\\\n", " "))
    assert args[:2] == ["lmcache", "server"]
    return [sys.executable, "-m", "kvhive", "server", *args[2:]]


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def wait_healthy(proc: subprocess.Popen, timeout: float = 60.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"kvhive server exited with {proc.returncode}")
        try:
            get("http://127.0.0.1:8080/healthcheck", 1.0)
            return time.monotonic() - start
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("kvhive server did not become healthy")


def run_client(client_python: str) -> dict:
    argv = [client_python, str(HERE / "drivers" / "l2.py"), "--url", "tcp://127.0.0.1:6555",
            "--http", "http://127.0.0.1:8080", "--chunks", str(CHUNKS), "--expect-l1-freed",
            "--no-clear", *CLIENT_SHAPE]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                          cwd=str(HERE / "drivers"), stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    mark = "@@KVHIVE_INTEROP_RESULT@@ "  # drivers/_common.py RESULT_MARK
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(mark):
            return {"rc": proc.returncode, **json.loads(line[len(mark) :])}
    return {"rc": proc.returncode, "stderr": proc.stderr[-3000:]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--client-python", required=True)
    args = p.parse_args()
    res: dict = {"argv": server_argv(args.workdir)[3:]}
    log = open(args.workdir / "server.log", "wb")  # noqa: SIM115 - closed in finally
    with otlp_receiver("localhost:4317") as receiver:
        proc = subprocess.Popen(server_argv(args.workdir), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            res["start_s"] = wait_healthy(proc)
            res["rss_after_start_mib"] = _rss_mib(proc.pid)
            res["client"] = run_client(args.client_python)
            status = json.loads(get("http://127.0.0.1:8080/status"))
            res["l2"] = status["l2"]["adapters"]
            res["metrics"] = get("http://127.0.0.1:9090/metrics").decode()
            res["pool_files"] = sorted(
                (n, os.path.getsize(args.workdir / "l2" / n))
                for n in os.listdir(args.workdir / "l2") if n.startswith("obj_")
            )  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            res["exit_code"] = proc.wait(60)
            log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not {"mp.store", "mp.retrieve"} <= receiver.names():
            time.sleep(0.1)
        res["spans"] = sorted(receiver.names())
    res["log_tail"] = (args.workdir / "server.log").read_text(errors="replace")[-4000:]
    sys.stdout.write("RESULT " + json.dumps(res) + "\n")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


if __name__ == "__main__":
    main()
