# shellcheck shell=bash
# Build-or-reuse skeleton shared by scripts/setup_client_venv.sh and scripts/setup_vllm_venv.sh.
# Sourced, never run. The caller runs under `set -euo pipefail` (the steps below rely on it to
# stop at the first failure, so call them as plain commands, not inside `if` or `||`), sets
# ROOT (the clone), SCHEMA and BASE_PYTHON, then:
#
#   venv_locate NAME FILE...   # where venv NAME lives: <cache>/venvs/NAME-<key of FILE...>
#   venv_reuse_or_start "$@"   # --print-path / reuse (exits), else lock and start a fresh venv
#   install_cpu_torch VERSION  # build steps: this, pip_install ... and the caller's own checks
#   venv_finish [NOTE]         # marker last, then the python path as the last stdout line
#
# The key hashes exactly "schema=$SCHEMA python=<x.y.z>\n" + FILE... : changing how it is
# computed orphans every venv already built, so leave it byte-for-byte as it is.

CACHE="${KVHIVE_CACHE:-${HOME:-/root}/.cache/kvhive}"
CONS="$ROOT/requirements/constraints.txt"
READY_FILES=()  # more files a ready venv must have (the caller may add after venv_locate)

# Tagged with the caller's name: venv NAME is built by scripts/setup_NAME_venv.sh.
log() { echo "[setup_${VENV_NAME}_venv] $*" >&2; }

# Sets VENV_NAME, pyver, key, VENV, PY and MARKER.
venv_locate() {
  VENV_NAME="$1"
  shift
  pyver="$("$BASE_PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
  key="$({ echo "schema=$SCHEMA python=$pyver"; cat "$@"; } | sha256sum | cut -c1-16)"
  VENV="$CACHE/venvs/$VENV_NAME-$key"
  PY="$VENV/bin/python"
  MARKER="$VENV/.kvhive-$VENV_NAME-ready"
}

# The marker is written last, so a half-built venv never counts as ready.
venv_ready() {
  local f
  [[ -f "$MARKER" && -x "$PY" ]] || return 1
  for f in ${READY_FILES[@]+"${READY_FILES[@]}"}; do
    [[ -f "$f" ]] || return 1
  done
  "$PY" -c 'pass' 2>/dev/null
}

# Returns only when this run must build: it then holds the venv's lock (fd 9, until exit) and
# $VENV is a fresh, empty venv. Everything else exits: 0 with the python path, 1 (--print-path,
# not built) or 2 (unknown argument).
venv_reuse_or_start() {
  if [[ "${1:-}" == "--print-path" ]]; then
    if venv_ready; then echo "$PY"; exit 0; fi
    log "not built: $VENV (run scripts/setup_${VENV_NAME}_venv.sh)"
    exit 1
  elif [[ $# -gt 0 ]]; then
    log "unknown argument: $1"
    exit 2
  fi

  if venv_ready; then echo "$PY"; exit 0; fi

  mkdir -p "$CACHE/venvs"
  exec 9>"$CACHE/venvs/.$VENV_NAME-$key.lock"
  flock 9
  if venv_ready; then echo "$PY"; exit 0; fi  # a concurrent run finished it

  started=$SECONDS
  log "building $VENV (python $pyver)"
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
}

# Every install is --no-deps under the constraints: no resolver runs, so nothing can replace
# the CPU torch. pip warns about every unused local index location; those lines are noise.
pip_install() {
  "$PY" -m pip --disable-pip-version-check install --quiet --no-deps -c "$CONS" "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2 || true)
}

# Find out which torch wheel pip would take and refuse anything but the CPU build (a CUDA
# wheel is GBs and would silently change what the tests measure), then install that wheel.
install_cpu_torch() {
  local version="$1" torch_version torch_url
  # global, not local: the EXIT trap runs after this function has returned
  report="$(mktemp)"
  trap 'rm -f "$report"' EXIT
  pip_install --dry-run --report "$report" "torch==$version"
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
      log "Put torch-$version+cpu on a pip find-links path (PIP_FIND_LINKS) and retry."
      exit 1
      ;;
  esac
  log "torch $torch_version from $torch_url"
  pip_install "$torch_url"
}

# NOTE, if given, ends the "ready in" log line.
# shellcheck disable=SC2120  # NOTE is optional
venv_finish() {
  touch "$MARKER"
  log "ready in $((SECONDS - started))s${1:+ $1}"
  echo "$PY"
}
