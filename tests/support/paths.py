"""Where kvhive's sources are, for subprocesses that run in an interpreter without kvhive
installed (the torch + lmcache 0.5.6 probe venv)."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root and kvhive's ``src`` directory.
REPO = Path(__file__).resolve().parents[2]
SRC_DIR = REPO / "src"


def env_with_src(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`SRC_DIR` first on
    ``PYTHONPATH``, so ``import kvhive`` works in any interpreter with kvhive's dependencies."""
    env = dict(os.environ if base is None else base)
    rest = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(SRC_DIR) + (os.pathsep + rest if rest else "")
    return env
