"""Facts about the machine a GPU check ran on (runs in any venv; torch optional).

Prints one ``RESULT_MARK`` JSON line.  ``cuda_available`` false (or torch missing)
makes the orchestrator stop with ``skipped: no-cuda``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import subprocess
import sys
from typing import Any

from gpu_check import RESULT_MARK

DISTS = (
    "torch", "numpy", "lmcache", "kvhive", "pyzmq", "msgspec", "cupy-cuda13x",
    "cuda-bindings", "numba", "opentelemetry-api", "fastapi", "pydantic",
)  # fmt: skip


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return ""


def collect(probe_lmcache: bool) -> dict[str, Any]:
    f: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in DISTS},
        "cuda_available": False,
    }
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means: no usable torch
        f["torch_error"] = f"{type(e).__name__}: {e}"
        return f
    f["torch"] = torch.__version__
    f["torch_cuda"] = torch.version.cuda
    try:
        f["cuda_available"] = bool(torch.cuda.is_available()) and torch.version.cuda is not None
    except Exception as e:  # noqa: BLE001
        f["cuda_error"] = f"{type(e).__name__}: {e}"
    if f["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        f["devices"] = torch.cuda.device_count()
        f["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
            "uuid": str(getattr(p, "uuid", "")),
        }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,name,memory.used", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        f["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        f["nvidia_smi"] = f"unavailable: {e}"
    if probe_lmcache:
        # In a child: a compiled extension built for another torch may fail to load (an
        # ImportError, recorded) or worse; either way this process and its report survive.
        for mod in ("lmcache.lmcache_native", "lmcache.cuda_ops"):
            try:
                p = subprocess.run(
                    [sys.executable, "-c", f"import torch, {mod}"],
                    capture_output=True, text=True, timeout=120, check=False,
                )  # fmt: skip
                tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
                f[f"import {mod}"] = "ok" if p.returncode == 0 else f"exit {p.returncode}: {tail}"
            except (OSError, subprocess.TimeoutExpired) as e:
                f[f"import {mod}"] = f"{type(e).__name__}: {e}"
    return f


def main(argv: list[str]) -> int:
    facts = collect(probe_lmcache="--lmcache" in argv)
    sys.stdout.write(RESULT_MARK + json.dumps(facts, sort_keys=True) + "\n")
    return 0
