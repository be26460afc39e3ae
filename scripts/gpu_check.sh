#!/usr/bin/env bash
# The GPU check of kvhive's CUDA data path, as ONE command for a CUDA machine with no network:
#
#   bash scripts/gpu_check.sh [OUTDIR]        (OUTDIR: default $OUT, else ./gpu-check-out)
#
# Needs .gpu-wheels/ from scripts/prepare_gpu_wheels.sh (carried along; git ignores it) and a
# python3 that holds a CUDA torch (the box's). Steps, each under `timeout`, all under 8 minutes:
#   1. preflight with the box's python3: no CUDA device -> OUTDIR/gpu-check.json says
#      "skipped" (no-cuda) and the exit code is 3; nothing is installed;
#   2. two venvs under a temp folder, each seeing the box's packages (torch!): `server`
#      (kvhive + closure) and `client` (lmcache 0.5.6 --no-deps + its worker-path imports);
#      wheels come from .gpu-wheels with --no-index --no-deps, only where the box lacks a
#      package or has a version the bundled wheels reject; torch is never installed;
#      a working tree newer than the kvhive wheel is overlaid (Python files only);
#   3. `python scripts/gpu_check run`: facts, `kvhive server` (lmcache_driven, loopback,
#      --l1-size-gb 8), the real lmcache worker adapter on GPU KV caches in every layout
#      (CUDA IPC; store, overwrite, retrieve into fresh blocks, byte-exact), cuda_raw
#      (isolated_ipc), TP 2, then `kvhive bench --sections cuda`; the server is stopped by PID.
# Exit: 0 all passed, 1 a check failed, 2 setup failed, 3 no CUDA device. docs/cuda.md.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$PWD/gpu-check-out}}"
WHEELS="${KVHIVE_GPU_WHEELS:-$ROOT/.gpu-wheels}"
HOSTPY="${KVHIVE_GPU_PYTHON:-python3}"
TOTAL_S="${KVHIVE_GPU_CHECK_TOTAL_S:-460}"   # the whole command, installs included (< 8 min)
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
T0=$(date +%s)
say() { echo "gpu_check: [$(( $(date +%s) - T0 ))s] $*"; }
setup_fail() {  # a report that says why, then exit 2
  say "SETUP FAILED: $*"
  "$HOSTPY" - "$OUTDIR" "$*" <<'EOF' || true
import json, sys, time
out, why = sys.argv[1], sys.argv[2]
json.dump({"status": "setup-failed", "reason": why, "checks": [], "finished_unix": time.time()},
          open(f"{out}/gpu-check.json", "w"), indent=2)
EOF
  exit 2
}

# 1. preflight (the box's python, which holds torch)
command -v "$HOSTPY" >/dev/null || setup_fail "no $HOSTPY on PATH"
# (KVHIVE_GPU_CHECK_SKIP_PREFLIGHT=1, for testing the install steps on a CPU machine: the
#  run stage then stops at its own no-CUDA check, with exit 3 too.)
if [[ "${KVHIVE_GPU_CHECK_SKIP_PREFLIGHT:-0}" != 1 ]]; then
  timeout 90 "$HOSTPY" "$ROOT/scripts/gpu_check" preflight --out "$OUTDIR"
  rc=$?
  if [[ $rc == 3 ]]; then say "no CUDA device: skipped (see $OUTDIR/gpu-check.json)"; exit 3; fi
  [[ $rc == 0 ]] || setup_fail "preflight exited $rc"
  "$HOSTPY" -c 'import torch; print("gpu_check: torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0))'
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

[[ -f "$WHEELS/manifest.json" ]] || setup_fail "no wheel bundle at $WHEELS (run scripts/prepare_gpu_wheels.sh on a machine with network, carry .gpu-wheels)"

# 2. venvs that see the box's site-packages. The box's python3 may itself be a venv, whose
#    packages --system-site-packages would NOT expose; a .pth file adds its site dirs.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvhive-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
HOST_SITES="$("$HOSTPY" -c 'import site, sys; print("\n".join(p for p in [*site.getsitepackages(), site.getusersitepackages()] if p))')"
make_venv() {  # make_venv NAME -> prints the venv's python
  local v="$WORK/$1" py
  if ! timeout 120 "$HOSTPY" -m venv --system-site-packages "$v" >>"$OUTDIR/install.log" 2>&1; then
    rm -rf "$v"
    timeout 60 "$HOSTPY" -m venv --system-site-packages --without-pip "$v" >>"$OUTDIR/install.log" 2>&1 || return 1
  fi
  py="$v/bin/python"
  local site
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
  printf '%s\n' "$HOST_SITES" >"$site/zz_gpu_check_host_sites.pth"
  echo "$py"
}
: >"$OUTDIR/install.log"
for set in server client; do
  py="$(make_venv "$set")" || setup_fail "could not create the $set venv (see install.log)"
  say "installing the $set set into $py"
  timeout 120 "$py" "$ROOT/scripts/gpu_check" install --set "$set" --wheels "$WHEELS" \
    --host-python "$(command -v "$HOSTPY")" --root "$ROOT" >>"$OUTDIR/install.log" 2>&1
  rc=$?
  if [[ $rc != 0 ]]; then
    tail -5 "$OUTDIR/install.log"
    setup_fail "installing the $set set exited $rc (see install.log)"
  fi
  declare "PY_${set}=$py"
done

# 3. the checks (the orchestrator stops everything it started, by PID)
LEFT_S=$(( TOTAL_S - ($(date +%s) - T0) ))
BUDGET_S=$(( LEFT_S - 45 ))   # the run's own budget; the rest is for stopping and cleaning up
(( BUDGET_S >= 60 )) || setup_fail "only ${LEFT_S}s left of ${TOTAL_S}s for the checks"
say "running the checks (budget ${BUDGET_S}s)"
timeout --kill-after=10 $(( LEFT_S - 15 )) "$PY_server" "$ROOT/scripts/gpu_check" run --out "$OUTDIR" \
  --server-python "$PY_server" --client-python "$PY_client" --budget-s "$BUDGET_S"
rc=$?
if [[ $rc == 124 || $rc == 137 ]]; then say "the run stage hit its time limit"; rc=1; fi
"$HOSTPY" - "$OUTDIR/gpu-check.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
print(f"gpu_check: {r['status']}: {r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped")
for c in r.get("checks", []):
    print(f"  {c['status']:8} {c['name']:28} {c['seconds']:7.2f}s  {c.get('error', '')[:160]}")
EOF
say "report: $OUTDIR/gpu-check.json (exit $rc)"
exit $rc
