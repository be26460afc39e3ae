#!/usr/bin/env bash
# Build the offline wheel bundle the GPU check installs from (docs/cuda.md).
#
#   scripts/prepare_gpu_wheels.sh [--verify]
#
# Writes .gpu-wheels/ (ignored by git; carried to the GPU machine, which has no network):
#   * kvhive's own wheel, built with a CPython 3.12 (the GPU box's Python) from the working
#     tree as it is now (committed or not);
#   * set `server`: kvhive's runtime closure for cp312 manylinux x86_64, pinned by
#     scripts/gpu_check/server-pins.txt;
#   * set `client`: the official lmcache 0.5.6 cp312 wheel (installed there with --no-deps)
#     and only what its worker-side modules import, pinned by requirements/interop-client.txt;
#     numba/llvmlite (imported too, 45 MB) and torch are NOT bundled: the box has them;
#   * manifest.json: the sets, sizes and the source fingerprint of the kvhive wheel.
# Fails if the bundle exceeds 60 MiB (the machine carries 64 MiB with the working tree).
# Idempotent: each run rebuilds into a staging folder and swaps it in at the end.
#
# --verify: also install the server set into a fresh 3.12 venv (no system packages, no index)
# and run kvhive's safecopy tests there, and dry-run-resolve both sets offline for cp312.
#
# Environment: KVHIVE_PY312 (a CPython 3.12; default: python3.12 on PATH, else pyenv's),
# KVHIVE_GPU_WHEELS (output folder; default <repo>/.gpu-wheels), KVHIVE_GPU_WHEELS_MAX_MIB (60).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${KVHIVE_GPU_WHEELS:-$ROOT/.gpu-wheels}"
MAX_MIB="${KVHIVE_GPU_WHEELS_MAX_MIB:-60}"
VERIFY=0
for a in "$@"; do
  case "$a" in
    --verify) VERIFY=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "prepare_gpu_wheels: unknown argument $a" >&2; exit 2 ;;
  esac
done

find_py312() {
  local c
  for c in "${KVHIVE_PY312:-}" "$(command -v python3.12 2>/dev/null || true)" \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    [[ -n "$c" && -x "$c" ]] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
PY312="$(find_py312)" || {
  echo "prepare_gpu_wheels: no CPython 3.12 found (set KVHIVE_PY312); kvhive's C extension" \
       "must be built for the GPU box's Python 3.12" >&2
  exit 2
}
echo "prepare_gpu_wheels: building with $PY312 ($("$PY312" -V 2>&1))"

# What the GPU box installs: CPython 3.12, glibc-based x86_64.
TARGET=(--only-binary=:all: --implementation cp --python-version 3.12
        --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform linux_x86_64)
PIP=("$PY312" -m pip --disable-pip-version-check)

STAGE="$(mktemp -d "${OUT%/}.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/src" "$STAGE/server" "$STAGE/client" "$STAGE/bundle"

# 1. kvhive's wheel, from a copy of the working tree (tracked + untracked-not-ignored
#    files), so the build's own build/ folder never lands in the shared checkout.
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$STAGE/src"
"${PIP[@]}" wheel --quiet --no-deps -w "$STAGE/server" "$STAGE/src"
KVHIVE_WHL="$(ls "$STAGE"/server/kvhive-*-cp312-*.whl)"
echo "prepare_gpu_wheels: built $(basename "$KVHIVE_WHL")"

# 2. set server: kvhive's runtime closure.
"${PIP[@]}" download --quiet "${TARGET[@]}" -c "$ROOT/scripts/gpu_check/server-pins.txt" \
  -d "$STAGE/server" "$KVHIVE_WHL"

# 3. set client: the official lmcache wheel without its ~40 declared requirements, then what
#    the worker adapter (lmcache.integration.vllm.vllm_multi_process_adapter), the transfer
#    context and the CUDA IPC wrappers import (docs/cuda.md lists how this was found).
CLIENT_CONS="$ROOT/requirements/interop-client.txt"
"${PIP[@]}" download --quiet "${TARGET[@]}" --no-deps -d "$STAGE/client" lmcache==0.5.6
"${PIP[@]}" download --quiet "${TARGET[@]}" -c "$CLIENT_CONS" -d "$STAGE/client" \
  pyzmq msgspec numpy prometheus_client nvtx cachetools psutil py-cpuinfo PyYAML \
  sortedcontainers aiohttp requests opentelemetry-api opentelemetry-sdk \
  opentelemetry-semantic-conventions importlib_metadata zipp typing_extensions

# 4. merge into one folder + manifest.json (the source fingerprint lets gpu_check.sh
#    refresh the installed Python files from a newer working tree).
PYTHONPATH="$ROOT/scripts" "$PY312" - "$STAGE/bundle" "$STAGE/server" "$STAGE/client" "$ROOT" <<'EOF'
import sys
from pathlib import Path
from gpu_check.bundle import write_manifest
out, server, client, root = map(Path, sys.argv[1:])
m = write_manifest(out, {"server": server, "client": client}, root, notes=[
    "numba, llvmlite, torch: not bundled (the GPU box has them)",
    "lmcache: the official 0.5.6 wheel, installed with --no-deps",
])
for name, files in m.sets.items():
    size = sum(m.sizes[f] for f in files)
    print(f"prepare_gpu_wheels: set {name}: {len(files)} wheels, {size / 2**20:.1f} MiB")
print(f"prepare_gpu_wheels: bundle {len(m.sizes)} wheels, {m.total_bytes / 2**20:.1f} MiB")
EOF

if [[ "$VERIFY" == 1 ]]; then
  # 5a. both sets resolve offline for cp312 (the client's lmcache with --no-deps).
  "${PIP[@]}" install --quiet --dry-run --ignore-installed --no-index --find-links "$STAGE/bundle" \
    "${TARGET[@]}" --target "$STAGE/dry-server" kvhive
  "${PIP[@]}" install --quiet --dry-run --ignore-installed --no-index --find-links "$STAGE/bundle" \
    "${TARGET[@]}" --no-deps --target "$STAGE/dry-client" lmcache==0.5.6
  "${PIP[@]}" install --quiet --dry-run --ignore-installed --no-index --find-links "$STAGE/bundle" \
    "${TARGET[@]}" --target "$STAGE/dry-client" -c "$CLIENT_CONS" pyzmq msgspec nvtx cachetools \
    opentelemetry-sdk importlib_metadata aiohttp requests PyYAML psutil py-cpuinfo sortedcontainers
  # 5b. the server set really installs and its C extension works on 3.12.
  "$PY312" -m venv "$STAGE/venv"
  SRV_FILES=$(PYTHONPATH="$ROOT/scripts" "$PY312" -c 'import sys; from pathlib import Path; from gpu_check.bundle import Manifest; d=Path(sys.argv[1]); print("\n".join(str(d/f) for f in Manifest.load(d).sets["server"]))' "$STAGE/bundle")
  # shellcheck disable=SC2086
  "$STAGE/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps $SRV_FILES
  "$STAGE/venv/bin/python" -m pip check
  # test tools only, from the index (not part of the bundle)
  "$STAGE/venv/bin/python" -m pip install --quiet --disable-pip-version-check pytest pytest-timeout
  (cd "$ROOT" && "$STAGE/venv/bin/python" -c 'import kvhive.transfer._safecopy as s; assert "site-packages" in s.__file__, s.__file__; print("prepare_gpu_wheels: verify:", s.__file__)')
  (cd "$ROOT" && "$STAGE/venv/bin/python" -m pytest -q -p no:cacheprovider \
     tests/unit/transfer/test_transfer_safecopy.py)
fi

# 6. size gate, then swap in.
TOTAL=$(du -cb "$STAGE"/bundle/*.whl | tail -1 | cut -f1)
TREE=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "prepare_gpu_wheels: wheels $((TOTAL / 1048576)) MiB ($TOTAL bytes); working tree $((TREE / 1048576)) MiB; limit ${MAX_MIB} MiB for the wheels, 64 MiB carried in all"
if (( TOTAL > MAX_MIB * 1048576 )); then
  echo "prepare_gpu_wheels: FAIL: the bundle is over ${MAX_MIB} MiB" >&2
  exit 1
fi
if (( TOTAL + TREE > 64 * 1048576 )); then
  echo "prepare_gpu_wheels: FAIL: wheels + working tree exceed the 64 MiB the GPU machine carries" >&2
  exit 1
fi
rm -rf "$OUT"
mv "$STAGE/bundle" "$OUT"
echo "prepare_gpu_wheels: wrote $OUT"
