#!/usr/bin/env bash
# KD versus KDIGA on MNIST-shaped data, from a PGD-trained teacher (theory.md §4), every number measured
# by certkd's own PGD-40 (`certkd certify --pgd-steps 40`).
#
#   examples/mnist_transfer.sh [DATA_DIR] [OUT]
#
# DATA_DIR holds the MNIST idx files (train-images-idx3-ubyte[.gz] ...); without it a synthetic
# stand-in made from the digits data is written to OUT/standin (examples/mnist_standin.py): NOT MNIST.
# Trains a PGD-AT teacher (registry cnn4, width 32; the registry also has lenet5), then
# students of a smaller cnn4 (width 8): natural (control), KD, clean KDIGA (iga-weight 1 on the
# sample scale), adversarial KDIGA (--recipe shao2021) and adversarial KDIGA started from the natural
# student's weights with a lower peak lr, 0.05 (claim 2). Prints clean and PGD-40 accuracy at three eps; writes OUT/table.md.
# Re-running continues: finished models are kept (--resume). Knobs (environment):
#   TEACHER_EPS=0.2 STUDENT_EPS=0.2 TEACHER_EPOCHS=8 STUDENT_EPOCHS=10 EPS_WARMUP=2 N_EVAL=1000
#   EVAL_EPS=0.1,0.2,0.3 DEVICE=cpu SEED=0 PYTHON=python3 STANDIN_TRAIN=6000 STANDIN_TEST=1000
set -euo pipefail
DATA_DIR="${1:-}"
OUT="${2:-runs/mnist_transfer}"
TEACHER_EPS="${TEACHER_EPS:-0.2}"
STUDENT_EPS="${STUDENT_EPS:-0.2}"
TEACHER_EPOCHS="${TEACHER_EPOCHS:-8}"
STUDENT_EPOCHS="${STUDENT_EPOCHS:-10}"
EPS_WARMUP="${EPS_WARMUP:-2}"
N_EVAL="${N_EVAL:-1000}"
EVAL_EPS="${EVAL_EPS:-0.1,0.2,0.3}"
DEVICE="${DEVICE:-cpu}"
SEED="${SEED:-0}"
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
certkd() { "$PY" -m certkd "$@"; }

mkdir -p "$OUT"
if [ -z "$DATA_DIR" ]; then
  DATA_DIR="$OUT/standin"
  [ -e "$DATA_DIR/t10k-labels-idx1-ubyte.gz" ] || \
    "$PY" "$HERE/mnist_standin.py" "$DATA_DIR" --train "${STANDIN_TRAIN:-6000}" --test "${STANDIN_TEST:-1000}"
  echo "data: synthetic MNIST-shaped stand-in in $DATA_DIR (not MNIST)" >&2
fi
COMMON=(--dataset mnist --data-dir "$DATA_DIR" --device "$DEVICE" --seed "$SEED" --no-progress --resume)
STUDENT=(--arch cnn4 --arch-kwargs '{"width": 8, "linear": 64}' --epochs "$STUDENT_EPOCHS" "${COMMON[@]}")
T="$OUT/teacher.pt"

set -x
certkd train --method pgd-at --arch cnn4 --arch-kwargs '{"width": 32, "linear": 128}' --eps "$TEACHER_EPS" \
  --attack-steps 10 --eps-warmup "$EPS_WARMUP" --epochs "$TEACHER_EPOCHS" --optimizer adam --lr 1e-3 \
  --weight-decay 0 "${COMMON[@]}" --out "$T"
certkd train --method natural --lr 0.05 "${STUDENT[@]}" --out "$OUT/natural.pt"
certkd train --method kd --teacher "$T" --lr 0.05 "${STUDENT[@]}" --eps "$STUDENT_EPS" --out "$OUT/kd.pt"
certkd train --method kdiga --teacher "$T" --iga-on clean --iga-weight 1 --lr 0.05 "${STUDENT[@]}" \
  --eps "$STUDENT_EPS" --out "$OUT/kdiga_clean.pt"
certkd train --recipe shao2021 --teacher "$T" --eps "$STUDENT_EPS" --eps-warmup "$EPS_WARMUP" "${STUDENT[@]}" \
  --out "$OUT/kdiga_adv.pt"
certkd train --recipe shao2021 --teacher "$T" --eps "$STUDENT_EPS" --eps-warmup "$EPS_WARMUP" "${STUDENT[@]}" \
  --init "$OUT/natural.pt" --lr 0.05 --out "$OUT/kdiga_adv_from_natural.pt"
for m in teacher natural kd kdiga_clean kdiga_adv kdiga_adv_from_natural; do
  certkd certify "$OUT/$m.pt" --dataset mnist --data-dir "$DATA_DIR" -n "$N_EVAL" --method ibp --eps "$EVAL_EPS" \
    --pgd-steps 40 --seed "$SEED" --out "$OUT/$m.eval.json" > "$OUT/$m.eval.txt" 2> "$OUT/$m.eval.log"
done
set +x

"$PY" - "$OUT" <<'PYEOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {"teacher": "teacher (cnn4 w32, PGD-AT)", "natural": "natural (control)", "kd": "KD",
        "kdiga_clean": "KDIGA clean, iga-weight 1", "kdiga_adv": "KDIGA --recipe shao2021",
        "kdiga_adv_from_natural": "KDIGA --recipe shao2021 from natural weights"}
evals = {m: json.loads((out / f"{m}.eval.json").read_text()) for m in rows}
eps = evals["teacher"]["config"]["eps"]
teacher_pgd = {r["eps"]: r["accuracy"] for r in evals["teacher"]["results"] if r["method"] == "pgd"}
lines = ["| student | clean | " + " | ".join(f"PGD-40 {e:g}" for e in eps) + " |",
         "|---|---|" + "---|" * len(eps)]
for m, label in rows.items():
    pgd = {r["eps"]: r["accuracy"] for r in evals[m]["results"] if r["method"] == "pgd"}
    cells = [f"{100 * pgd[e]:.1f}" + ("" if m == "teacher" or not teacher_pgd[e] else
                                      f" ({100 * pgd[e] / teacher_pgd[e]:.0f} %)") for e in eps]
    lines.append(f"| {label} | {100 * evals[m]['clean_accuracy']['accuracy']:.1f} | " + " | ".join(cells) + " |")
n = evals["teacher"]["num_examples"]
lines.append(f"\nClean and PGD-40 accuracy (%, an estimate) on the first {n} test points; in brackets the share of "
             "the teacher's PGD accuracy kept.")
table = "\n".join(lines)
(out / "table.md").write_text(table + "\n")
print(table)
PYEOF
