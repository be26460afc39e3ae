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
CONS="$ROOT/requirements/constraints.txt"
BASE_PYTHON="${KVHIVE_CLIENT_BASE_PYTHON:-python3}"
CACHE="${KVHIVE_CACHE:-${HOME:-/root}/.cache/kvhive}"

log() { echo "[setup_client_venv] $*" >&2; }

pyver="$("$BASE_PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
key="$({ echo "schema=$SCHEMA python=$pyver"; cat "$REQ" "$CONS"; } | sha256sum | cut -c1-16)"
VENV="$CACHE/venvs/client-$key"
PY="$VENV/bin/python"
MARKER="$VENV/.kvhive-client-ready"

ready() { [[ -f "$MARKER" && -x "$PY" ]] && "$PY" -c 'pass' 2>/dev/null; }

if [[ "${1:-}" == "--print-path" ]]; then
  if ready; then echo "$PY"; exit 0; fi
  log "not built: $VENV (run scripts/setup_client_venv.sh)"
  exit 1
elif [[ $# -gt 0 ]]; then
  log "unknown argument: $1"
  exit 2
fi

if ready; then echo "$PY"; exit 0; fi

mkdir -p "$CACHE/venvs"
exec 9>"$CACHE/venvs/.client-$key.lock"
flock 9
if ready; then echo "$PY"; exit 0; fi  # a concurrent run finished it

started=$SECONDS
log "building $VENV (python $pyver)"
rm -rf "$VENV"
"$BASE_PYTHON" -m venv "$VENV"
# pip warns about every unused local index location; those lines are noise.
pip_() {
  "$PY" -m pip --disable-pip-version-check "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2 || true)
}

# 1. torch: find out which wheel pip would take and refuse anything but the CPU build.
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
pip_ install --quiet --no-deps -c "$CONS" --dry-run --report "$report" "torch==2.13.0"
read -r torch_version torch_url < <("$PY" - "$report" <<'EOF'
import json, sys
item = json.load(open(sys.argv[1]))["install"][0]
print(item["metadata"]["version"], item["download_info"]["url"])
EOF
)
case "$torch_version" in
  *+cpu) ;;
  *)
    log "refusing to install torch $torch_version from $torch_url: not a CPU build."
    log "Put torch-2.13.0+cpu on a pip find-links path (PIP_FIND_LINKS) and retry."
    exit 1
    ;;
esac
log "torch $torch_version from $torch_url"
pip_ install --quiet --no-deps -c "$CONS" "$torch_url"

# 2. Everything else: the pinned closure, no resolver.
pip_ install --quiet --no-deps -c "$CONS" -r "$REQ"

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

touch "$MARKER"
log "ready in $((SECONDS - started))s"
echo "$PY"
