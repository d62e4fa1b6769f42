#!/usr/bin/env bash
# The bound methods proven on a device: one prepared script, one table (bench/README.md).
#
#   bash bench/gpu_check.sh [--backend 0.7|0.3|installed] [--device cuda|cpu] [--small] [--json FILE]
#
# The device machine reaches no package registry: before a device run copy the wheels into the
# untracked folder .whl/ of the working tree (cp ../shared/wheels/*.whl .whl/). This script then
# installs from .whl/ (else ../shared/wheels/) with --no-deps --no-index:
#   --backend 0.7 (default): auto_LiRPA 0.7.1 in .venv-lirpa07/ (scripts/setup_backend07.sh);
#   --backend 0.3: auto_LiRPA 0.3 into the current python when it has none;
#   --backend installed: whatever auto_LiRPA the current python has (CI's CPU smoke run).
# torch (with CUDA on the device) and certkd's other dependencies must already be installed;
# certkd itself is used from this working tree (PYTHONPATH). Exit code: 0 when every row of the
# table passes its check, 1 when one fails, 2 when nothing could be installed or run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BACKEND=0.7
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) BACKEND=${2:-}; shift 2 ;;
        --backend=*) BACKEND=${1#--backend=}; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
WHEELS=""
for dir in .whl ../shared/wheels; do
    if ls "$dir"/*.whl >/dev/null 2>&1; then WHEELS=$dir; break; fi
done
case "$BACKEND" in
    0.7)
        if [ -z "$WHEELS" ]; then
            echo "gpu_check: no wheels in .whl/ or ../shared/wheels/: copy ../shared/wheels/*.whl into .whl/ first" >&2
            exit 2
        fi
        PY=$(CERTKD_WHEELS=$WHEELS PYTHON=$PY bash scripts/setup_backend07.sh | tail -n 1) ;;
    0.3)
        if ! "$PY" -c "import importlib.metadata as m; m.version('auto_LiRPA')" >/dev/null 2>&1; then
            if [ -z "$WHEELS" ]; then
                echo "gpu_check: auto_LiRPA is not installed and no wheels are in .whl/ or ../shared/wheels/" >&2
                exit 2
            fi
            "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/auto_LiRPA-0.3-*.whl "$WHEELS"/graphviz-*.whl \
                "$WHEELS"/appdirs-*.whl
        fi ;;
    installed) ;;
    *) echo "gpu_check: --backend must be 0.7, 0.3 or installed, got '$BACKEND'" >&2; exit 2 ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MISSING=$("$PY" - <<'PYEOF'
import importlib.util
needed = ("torch", "numpy", "scipy", "click", "tqdm", "yaml", "packaging", "appdirs", "auto_LiRPA")
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
PYEOF
)
if [ -n "$MISSING" ]; then
    echo "gpu_check: $PY lacks $MISSING (certkd's dependencies must be installed on this machine first)" >&2
    exit 2
fi
exec "$PY" bench/gpu_check.py ${ARGS[@]+"${ARGS[@]}"}
