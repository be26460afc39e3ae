#!/usr/bin/env bash
# Build, or reuse, the cached LMCache 0.5.7 client venv that tests/interop057 drives kvhive with.
#
#   scripts/setup_client057_venv.sh               build if needed; print the venv's python (last line)
#   scripts/setup_client057_venv.sh --print-path  print it only if already built, else exit 1 (never builds)
#
# The venv lives OUTSIDE the clone, at
#   ${KVHIVE_CACHE:-$HOME/.cache/kvhive}/venvs/client057-<key>
# where <key> hashes requirements/interop-client057.txt, requirements/constraints.txt,
# the base interpreter's version and SCHEMA below (scripts/lib/cached_venv.sh).
#
# Contents: CPU torch 2.13.0 (never a CUDA wheel), lmcache-cli 0.5.7rc3.dev0 (LMCache 0.5.7's
# Python, no compiled modules) and exactly what its client modules import, all --no-deps
# (see requirements/interop-client057.txt). The check imports those modules the way the tests
# do (tests/interop057/drivers/lmc057.py) and reports the ones that need native code.
#
# Environment: KVHIVE_CACHE (cache root), KVHIVE_CLIENT_BASE_PYTHON (interpreter
# the venv is made from; default python3).
set -euo pipefail

SCHEMA=1  # bump to force a rebuild when this script's recipe changes
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements/interop-client057.txt"
BASE_PYTHON="${KVHIVE_CLIENT_BASE_PYTHON:-python3}"
# shellcheck source=scripts/lib/cached_venv.sh
source "$ROOT/scripts/lib/cached_venv.sh"  # sets CACHE and CONS

venv_locate client057 "$REQ" "$CONS"
venv_reuse_or_start "$@"

# 1. torch: only the CPU build.
install_cpu_torch 2.13.0

# 2. Everything else: the pinned closure, no resolver.
pip_install -r "$REQ"

# 3. Check that 0.5.7's client code loads and its encoders work (no server needed).
LMCACHE_LOG_LEVEL=ERROR LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 \
  "$PY" "$ROOT/tests/interop057/drivers/lmc057.py" >&2

venv_finish
