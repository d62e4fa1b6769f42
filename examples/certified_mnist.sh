#!/usr/bin/env bash
# Certified training and certified distillation on MNIST at L-inf 0.1 (theory.md §7), every number
# certified by CROWN (`certkd certify --method crown`), never by the training bound.
#
#   examples/certified_mnist.sh DATA_DIR [OUT]
#
# DATA_DIR holds the MNIST idx files (bash ../shared/data/mnist.sh DIR). Trains an IBP teacher
# (registry cnn4, 166k parameters), then two students of cnn4 width 8 / linear 32 (27.6k parameters,
# a sixth): certified training alone (ibp) and certified distillation (cert-kd: (1 - alpha) L_IBP +
# alpha tau^2 KL(T || S), alpha 0.5). All three: 4 epochs, a smoothed ramp to eps 0.1 over 2 epochs,
# kappa 1 -> 0, Adam 2e-3 with cosine decay, batch 256. Then CROWN and IBP certification on the first
# N_EVAL test points, `certkd compare` of each student against the teacher, and the transfer
# certificate of `certkd bounds --certified-gamma`. Re-running continues (--resume).
# Knobs (environment): EPOCHS=4 WARMUP=2 N_EVAL=1000 N_PAIR=64 DEVICE=cpu SEED=0 PYTHON=python3
set -euo pipefail
DATA_DIR="${1:?usage: examples/certified_mnist.sh DATA_DIR [OUT]}"
OUT="${2:-runs/certified_mnist}"
EPOCHS="${EPOCHS:-4}" WARMUP="${WARMUP:-2}" N_EVAL="${N_EVAL:-1000}" N_PAIR="${N_PAIR:-64}"
DEVICE="${DEVICE:-cpu}" SEED="${SEED:-0}" PY="${PYTHON:-python3}"
certkd() { "$PY" -m certkd "$@"; }
mkdir -p "$OUT"
COMMON=(--dataset mnist --data-dir "$DATA_DIR" --device "$DEVICE" --seed "$SEED" --eps 0.1 --epochs "$EPOCHS"
        --eps-warmup "$WARMUP" --eps-schedule smoothed --kappa-start 1 --kappa-end 0 --optimizer adam --lr 2e-3
        --weight-decay 0 --batch-size 256 --no-progress --resume)
SMALL=(--arch cnn4 --arch-kwargs '{"width": 8, "linear": 32}')
certkd train --method ibp --arch cnn4 "${COMMON[@]}" --out "$OUT/teacher.pt"
certkd train --method ibp "${SMALL[@]}" "${COMMON[@]}" --out "$OUT/student_ibp.pt"
certkd train --method cert-kd --teacher "$OUT/teacher.pt" --alpha 0.5 "${SMALL[@]}" "${COMMON[@]}" \
    --out "$OUT/student_certkd.pt"
for model in teacher student_ibp student_certkd; do
    certkd certify "$OUT/$model.pt" --data-dir "$DATA_DIR" -n "$N_EVAL" --eps 0.1 --method ibp,crown \
        --out "$OUT/$model.certify.json" --overwrite --no-progress
done
for student in student_ibp student_certkd; do
    certkd compare "$OUT/$student.pt" "$OUT/teacher.pt" --data-dir "$DATA_DIR" -n "$N_PAIR" --method crown \
        --out "$OUT/$student.compare" --overwrite --no-progress
    certkd bounds "$OUT/$student.pt" "$OUT/teacher.pt" --data-dir "$DATA_DIR" -n "$N_PAIR" --eps 0.1 \
        --certified-gamma --method crown --out "$OUT/$student.bounds" --overwrite --no-progress
done
