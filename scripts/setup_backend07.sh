#!/usr/bin/env bash
# The second bound-propagation environment: auto_LiRPA 0.7.x next to the 0.3 one.
# Creates the virtual environment .venv-lirpa07/ (git-ignored) with --system-site-packages, so
# torch, numpy and certkd's other dependencies come from the main environment, and installs into
# it, with --no-deps (0.7.1's metadata caps torch below 2.9), the wheels of ../shared/wheels/:
# auto_lirpa-0.7.1, graphviz (a real import-time dependency) and appdirs. Idempotent.
# Prints the environment's python on the last line of stdout; exits 3 when the wheel folder is
# missing (the caller then skips the second run and says so).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${CERTKD_WHEELS:-../shared/wheels}
VENV=${CERTKD_LIRPA07_VENV:-.venv-lirpa07}
WHEEL=$(ls "$WHEELS"/auto_lirpa-0.7.*-py3-none-any.whl 2>/dev/null | sort | tail -n 1 || true)
if [ -z "$WHEEL" ]; then
    echo "setup_backend07: no auto_lirpa-0.7.x wheel in $WHEELS: the auto_LiRPA 0.7 environment is not created" >&2
    exit 3
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" - "$WHEEL" <<'PYEOF'
import importlib.metadata, pathlib, sys
want = pathlib.Path(sys.argv[1]).name.split("-")[1]
try:
    sys.exit(importlib.metadata.version("auto_LiRPA") != want)
except importlib.metadata.PackageNotFoundError:
    sys.exit(1)
PYEOF
then
    "$VENV/bin/python" -m pip install -q --no-deps --no-index "$WHEEL" "$WHEELS"/graphviz-*.whl "$WHEELS"/appdirs-*.whl
fi
echo "$VENV/bin/python"
