#!/usr/bin/env bash
# Build, or reuse, the cached lmcache 0.5.6 client venv that tests/interop drives kvhive with.
#
#   scripts/setup_client_venv.sh               build if needed; print the venv's python (last line)
#   scripts/setup_client_venv.sh --print-path  print it only if already built, else exit 1 (never builds)
#
# The venv lives OUTSIDE the clone, at
#   ${KVHIVE_CACHE:-$HOME/.cache/kvhive}/venvs/client-<key>
# where <key> hashes requirements/interop-client.txt, requirements/constraints.txt,
# the base interpreter's version and SCHEMA below. A marker file written last
# makes a reused venv cheap to check and a half-built one invisible.
#
# Contents: CPU torch 2.13.0 (never a CUDA wheel), lmcache 0.5.6 and the pinned
# closure of what the client, `lmcache server` and `lmcache bench server --mode cpu`
# need, all installed with --no-deps (see requirements/interop-client.txt).
#
# Environment: KVHIVE_CACHE (cache root), KVHIVE_CLIENT_BASE_PYTHON (interpreter
# the venv is made from; default python3).
set -euo pipefail

SCHEMA=1  # bump to force a rebuild when this script's recipe changes
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements/interop-client.txt"
BASE_PYTHON="${KVHIVE_CLIENT_BASE_PYTHON:-python3}"
# shellcheck source=scripts/lib/cached_venv.sh
source "$ROOT/scripts/lib/cached_venv.sh"  # sets CACHE and CONS

venv_locate client "$REQ" "$CONS"
venv_reuse_or_start "$@"

# 1. torch: only the CPU build.
install_cpu_torch 2.13.0

# 2. Everything else: the pinned closure, no resolver.
pip_install -r "$REQ"

# 3. Check what the interop tests need really works.
LMCACHE_LOG_LEVEL=WARNING LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 "$PY" - <<'EOF'
import importlib.metadata as md

import torch

assert torch.version.cuda is None, f"CUDA torch installed: {torch.__version__}"
assert md.version("lmcache") == "0.5.6", md.version("lmcache")
# client side
import lmcache.integration.vllm.vllm_multi_process_adapter  # noqa: F401
import lmcache.integration.vllm.kv_cache_groups  # noqa: F401
import lmcache.v1.multiprocess.transfer_context  # noqa: F401
# `lmcache server` / `lmcache bench server` fall back to stubs if these fail
import lmcache.cli.commands.bench.server_bench.client  # noqa: F401
import lmcache.v1.multiprocess.server  # noqa: F401
from lmcache.v1.distributed.config import add_storage_manager_args  # noqa: F401
from lmcache.v1.multiprocess.config import add_mp_server_args  # noqa: F401
EOF

venv_finish
