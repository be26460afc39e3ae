"""The prepared GPU check of kvhive's CUDA data path (issue 14).

Run on a CUDA machine as ``bash scripts/gpu_check.sh [OUTDIR]``, after
``scripts/prepare_gpu_wheels.sh`` built the wheel bundle (``.gpu-wheels/``) on a
machine with network access.  docs/cuda.md describes both.

The package is run as a directory (``python scripts/gpu_check <command>``, see
``__main__.py``).  Its modules split by where they run:

* ``bundle``, ``report``, ``orchestrate``: stdlib only; the orchestrator runs in the
  server venv, the bundle code in whichever interpreter installs.
* ``facts``, ``client``, ``kv_layouts``: torch (and, for ``client``, the real
  lmcache 0.5.6 client); they run in the client venv and never import kvhive.

Exit codes of ``run`` (and so of gpu_check.sh):
"""

from __future__ import annotations

EXIT_PASSED = 0  # every check passed
EXIT_FAILED = 1  # at least one check failed (OUTDIR/gpu-check.json says which)
EXIT_SETUP = 2  # the check could not start: no bundle, install failed, bad arguments
EXIT_NO_CUDA = 3  # no CUDA device (or no CUDA torch): nothing was checked, JSON says skipped

REPORT_NAME = "gpu-check.json"
RESULT_MARK = "@@GPU_CHECK_RESULT@@ "

__doc__ += """
* 0 every check passed; 1 a check failed; 2 setup failed; 3 no CUDA device (skipped).
"""
