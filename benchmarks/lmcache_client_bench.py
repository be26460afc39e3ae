"""Store/retrieve/lookup timings through the real lmcache 0.5.6 vLLM adapters, one engine.

Runs INSIDE the lmcache client venv (``scripts/setup_client_venv.sh``) against any server
that speaks the protocol (kvhive or the reference) and prints one JSON object.  This is the
stand-alone entry of the driver ``kvhive bench`` runs for its lmcache-client figures
(``src/kvhive/bench/drivers/lmcache_client.py``, which documents the arguments)::

    python benchmarks/lmcache_client_bench.py transfer --url tcp://127.0.0.1:5555 \\
        --mode lmcache_driven --chunks 16 --per-request 1 16 --rounds 5
    python benchmarks/lmcache_client_bench.py lookup --url tcp://127.0.0.1:5555 \\
        --layers 2 --heads 1 --head-size 16 --prefixes 1 64 400

``transfer`` prints request spans; ``kvhive bench`` turns them into GB/s (one engine: bytes
per request / median request time).
"""

from __future__ import annotations

import runpy
from pathlib import Path

DRIVER = Path(__file__).resolve().parents[1] / "src" / "kvhive" / "bench" / "drivers"

if __name__ == "__main__":
    runpy.run_path(str(DRIVER / "lmcache_client.py"), run_name="__main__")
