"""The ``mooncake`` rows of the ``l2`` bench section, run as a script in kvhive's interpreter
INSIDE a private network namespace (Mooncake's client and master bind every interface)::

    unshare -n -- sh -c 'ip link set lo up && exec "$0" "$@"' \\
        python -m kvhive.bench.l2_mooncake '{"variants": ["default", "raw"], "reps": 5, ...}'

It starts ``mooncake_master`` on loopback ports (RPC and metrics on 127.0.0.1, the HTTP
metadata server off), then for each variant times the ``mooncake_store`` adapter against the
raw ``MooncakeDistributedStore.put_from``/``get_into`` floor (:func:`measure_pair`), and
prints one JSON object ``{variant: {"result"|"skipped"|"error": ..., "floor": ...}}`` as its
last stdout line.  Progress and Mooncake's logs go to stderr.  The master is stopped at exit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvhive.bench.l2_floors import MooncakeMover
from kvhive.bench.l2_measure import AdapterMover, Arena, measure_pair
from kvhive.bench.l2_services import stop, wait_port
from kvhive.bench.servers import free_port

SEGMENT = "536870912"
LOCAL_BUFFER = "134217728"


def master_binary() -> str | None:
    """``mooncake_master`` on PATH or beside this interpreter (a venv's bin)."""
    return shutil.which("mooncake_master") or next(
        (str(p) for p in [Path(sys.executable).parent / "mooncake_master"] if p.exists()), None
    )


def client_setup(rpc_port: int) -> dict[str, str]:
    """Client settings for a loopback master over TCP, no metadata server (P2PHANDSHAKE)."""
    return {"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE", "protocol": "tcp",
            "global_segment_size": SEGMENT, "local_buffer_size": LOCAL_BUFFER,
            "master_server_addr": f"127.0.0.1:{rpc_port}"}  # fmt: skip


def measure(args: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every variant of ``args["variants"]`` against one master started here."""
    variants: list[str] = args["variants"]
    exe = master_binary()
    if exe is None:
        return {v: {"skipped": "mooncake_master is not installed"} for v in variants}
    rpc, metrics = free_port(), free_port()
    argv = [exe, "--rpc_address=127.0.0.1", f"--rpc_port={rpc}", "--metrics_host=127.0.0.1",
            f"--metrics_port={metrics}", "--logtostderr=true"]  # fmt: skip
    master = subprocess.Popen(argv, stdout=sys.stderr, stderr=sys.stderr)
    arena = Arena(int(args["object_bytes"]))
    out: dict[str, dict[str, Any]] = {}
    try:
        wait_port(rpc, master, "mooncake_master")
        setup = client_setup(rpc)
        for v in variants:
            raw: dict[str, Any] = {"type": "mooncake_store", **setup}
            if v == "raw":
                raw["integrity"] = "raw"
            tier = floor = None
            try:
                floor = MooncakeMover(arena, setup)
                tier = AdapterMover(raw, arena)
                res = measure_pair(tier, floor, int(args["reps"]), cold=bool(args["cold"]))
                out[v] = {"result": res.to_dict(), "floor": MooncakeMover.what}
            except Exception as exc:  # noqa: BLE001 - reported to the parent as this row's error
                out[v] = {"error": f"{type(exc).__name__}: {exc}", "floor": MooncakeMover.what}
            finally:
                for m in (tier, floor):
                    if m is not None:
                        m.close()
    finally:
        stop(master)
        arena.close()
    return out


def main(argv: list[str]) -> int:
    result = measure(json.loads(argv[0]))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
