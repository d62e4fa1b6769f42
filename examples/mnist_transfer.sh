#!/usr/bin/env bash
# Does a small student keep a PGD-trained teacher's robustness on real MNIST? (theory.md §4, §8)
#
#   examples/mnist_transfer.sh DATA_DIR [OUT]
#
# DATA_DIR holds the MNIST idx files (bash shared/data/mnist.sh DIR fetches them). Trains a PGD-AT
# teacher (advertorch's LeNet5 layout, `lenet5`, 648k parameters) at TEACHER_EPS, then for every eps of
# STUDENT_EPS students of `cnn4` width 8 (82k parameters, an eighth of the teacher) with:
#   KDIGA --recipe shao2021 (the point of POINT: adversarial, the authors' one-step point, or pgd, the
#   ATTACK_STEPS-step point; the IGA weight swept over IGA_WEIGHTS, 0 = no IGA term),
#   and the controls: the student's own PGD-AT (no teacher), ARD, RSLAD, and once KD (eps-free).
# The controls take the recipe's optimizer and schedule (SGD, cyclic lr up to 0.05, eps ramped over the
# first half of the epochs), so only the objective differs. Every model is evaluated by
# `certkd certify --method apgd --pgd-steps 40` on the first N_EVAL test points: clean, PGD-40 and APGD
# accuracy (estimates) at 0.1, 0.2, 0.3; OUT/table.md gets the table. Re-running continues (--resume).
# Knobs (environment): TEACHER=path (an existing teacher; skips its training) TRAIN_SUBSET=6000 (the
# first N training images, written to OUT/data; 0 = all) TEACHER_EPOCHS=8 STUDENT_EPOCHS=6 TEACHER_EPS=0.3
# STUDENT_EPS="0.1 0.2 0.3" POINT=adversarial IGA_WEIGHTS="1 0" IGA_FRACTION=1 (--iga-fraction; the
# students' names get _fF when it is not 1) CONTROLS="pgd-at ard rslad kd"
# ATTACK_STEPS=10 N_EVAL=500 DEVICE=cpu SEED=0 PYTHON=python3
set -euo pipefail
DATA_DIR="${1:?give the folder of the MNIST idx files}"
OUT="${2:-runs/mnist_transfer}"
TRAIN_SUBSET="${TRAIN_SUBSET:-6000}"
TEACHER_EPOCHS="${TEACHER_EPOCHS:-8}"
STUDENT_EPOCHS="${STUDENT_EPOCHS:-6}"
TEACHER_EPS="${TEACHER_EPS:-0.3}"
STUDENT_EPS="${STUDENT_EPS-0.1 0.2 0.3}"  # empty: none (the teacher only)
POINT="${POINT:-adversarial}"
IGA_WEIGHTS="${IGA_WEIGHTS:-1 0}"
IGA_FRACTION="${IGA_FRACTION:-1}"
CONTROLS="${CONTROLS-pgd-at ard rslad kd}"  # empty: none
ATTACK_STEPS="${ATTACK_STEPS:-10}"
N_EVAL="${N_EVAL:-500}"
DEVICE="${DEVICE:-cpu}"
SEED="${SEED:-0}"
PY="${PYTHON:-python3}"
certkd() { "$PY" -m certkd "$@"; }

mkdir -p "$OUT"
if [ "$TRAIN_SUBSET" != 0 ]; then  # the first TRAIN_SUBSET training images, the full test split
  "$PY" - "$DATA_DIR" "$OUT/data" "$TRAIN_SUBSET" <<'PYEOF'
import gzip, os, struct, sys
from pathlib import Path
src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dst.mkdir(parents=True, exist_ok=True)
def read(stem):
    for name in (stem + ".gz", stem):
        if (src / name).exists():
            raw = (src / name).read_bytes()
            return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    sys.exit(f"{src}: no {stem}[.gz]")
for stem, header in (("train-images-idx3-ubyte", 16), ("train-labels-idx1-ubyte", 8)):
    raw = read(stem)
    size = 784 if header == 16 else 1
    (dst / stem).write_bytes(raw[:4] + struct.pack(">I", n) + raw[8:header] + raw[header:header + n * size])
for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    (dst / stem).write_bytes(read(stem))
PYEOF
  DATA_DIR="$OUT/data"
fi
COMMON=(--dataset mnist --data-dir "$DATA_DIR" --device "$DEVICE" --seed "$SEED" --no-progress --resume)
STUDENT=(--arch cnn4 --arch-kwargs '{"width": 8}' --epochs "$STUDENT_EPOCHS" "${COMMON[@]}")
# the recipe's settings for a student without normalization, for the controls (see `certkd train --help`)
SCHEDULE=(--optimizer sgd --lr 0.05 --lr-schedule cyclic --weight-decay 5e-4)
HALF=$("$PY" -c "print($STUDENT_EPOCHS / 2)")
ATTACK=(--attack-steps "$ATTACK_STEPS" --eps-warmup "$HALF")

T="${TEACHER:-$OUT/teacher.pt}"
set -x
[ -n "${TEACHER:-}" ] || certkd train --method pgd-at --arch lenet5 --eps "$TEACHER_EPS" --attack-steps "$ATTACK_STEPS" \
  --eps-warmup 2 --epochs "$TEACHER_EPOCHS" --optimizer adam --lr 1e-3 --weight-decay 0 "${COMMON[@]}" --out "$T"
MODELS=()
FRACTION_TAG=$([ "$IGA_FRACTION" = 1 ] || echo "_f$IGA_FRACTION")
for e in $STUDENT_EPS; do
  for w in $IGA_WEIGHTS; do
    name="kdiga_${POINT}_w${w}${FRACTION_TAG}_$e"
    certkd train --recipe shao2021 --teacher "$T" --eps "$e" --iga-on "$POINT" --iga-weight "$w" \
      --iga-fraction "$IGA_FRACTION" --attack-steps "$ATTACK_STEPS" "${STUDENT[@]}" --out "$OUT/$name.pt"
    MODELS+=("$name")
  done
  for c in $CONTROLS; do
    case $c in
      kd) continue ;;
      pgd-at) certkd train --method pgd-at --eps "$e" "${ATTACK[@]}" "${SCHEDULE[@]}" "${STUDENT[@]}" --out "$OUT/${c}_$e.pt" ;;
      *) certkd train --method "$c" --teacher "$T" --eps "$e" "${ATTACK[@]}" "${SCHEDULE[@]}" "${STUDENT[@]}" \
           --out "$OUT/${c}_$e.pt" ;;
    esac
    MODELS+=("${c}_$e")
  done
done
case " $CONTROLS " in *" kd "*)
  certkd train --method kd --teacher "$T" "${SCHEDULE[@]}" "${STUDENT[@]}" --out "$OUT/kd.pt"; MODELS+=(kd) ;; esac
cp -n "$T" "$OUT/teacher.pt" 2>/dev/null || true
for m in teacher "${MODELS[@]}"; do
  [ -e "$OUT/$m.eval.json" ] || certkd certify "$OUT/$m.pt" --dataset mnist --data-dir "$DATA_DIR" -n "$N_EVAL" \
    --method apgd --eps 0.1,0.2,0.3 --pgd-steps 40 --seed "$SEED" --out "$OUT/$m.eval.json" > "$OUT/$m.eval.txt"
done
set +x
"$PY" "$(dirname "$0")/mnist_table.py" "$OUT" teacher "${MODELS[@]}" | tee "$OUT/table.md"
