#!/usr/bin/env bash
# Events on vs off (issue 16): `kvhive bench --sections engine,lookup` with kvhive's direct
# KV-event publisher unbound ("off") and bound with a subscriber decoding every batch with
# vLLM's classes ("on"), interleaved ROUNDS times (the machine is noisy: compare medians).
#   benchmarks/kv_events_onoff.sh [ROUNDS=3] [OUT_DIR=benchmarks/results/kv-events-<date>]
# Needs the vLLM venv (KVHIVE_VLLM_PYTHON or scripts/setup_vllm_venv.sh) for the subscriber.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
out=${2:-benchmarks/results/kv-events-$(date +%F)}
vllm_py=${KVHIVE_VLLM_PYTHON:-$(bash scripts/setup_vllm_venv.sh --print-path 2>/dev/null | tail -n 1)}
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$out"
run() {  # run MODE N
  local mode=$1 n=$2 extra=() sub=
  if [[ $mode == on ]]; then
    extra=(--server-arg=--kv-events-endpoint "--server-arg=tcp://127.0.0.1:$port")
    "$vllm_py" tests/support/vllm_kv_sub.py --endpoint "tcp://127.0.0.1:$port" \
      --out "$out/sub-$n.jsonl" >/dev/null 2>&1 &
    sub=$!
    sleep 12 # importing vllm
  fi
  .venv/bin/kvhive bench --sections engine,lookup --clients kvhive --engine-shapes smollm2-135m \
    --lookup-samples 1000 "${extra[@]}" --json "$out/engine-lookup-$mode-$n.json" >"$out/$mode-$n.log" 2>&1
  if [[ -n $sub ]]; then
    kill "$sub"
    wait "$sub" 2>/dev/null || true
  fi
}
for i in $(seq 1 "$rounds"); do
  run off "$i"
  run on "$i"
done
echo "results in $out"
