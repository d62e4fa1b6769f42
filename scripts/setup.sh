#!/usr/bin/env bash
# One-step set-up on a fresh machine (idempotent).
# - keeps a torch that is already installed (GPU users); otherwise installs the
#   pinned CPU-capable torch==2.13.0 first, so pip never pulls a CUDA build on its own;
# - installs certkd (editable) with the dev and onnx extras (the tests use onnx);
# - installs auto_LiRPA 0.3 with --no-deps (its metadata pins torch<1.13; certkd
#   applies runtime compatibility shims, see bounds/lirpa.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev,onnx]"
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('auto_LiRPA') is None)"; then
    "$PY" -m pip install -q --no-deps "auto-LiRPA==0.3"
fi
