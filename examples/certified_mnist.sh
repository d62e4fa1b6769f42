#!/usr/bin/env bash
# Certified training and certified distillation on MNIST at L-inf EPS (theory.md §7), every number
# certified by CROWN (`certkd certify --method crown`), never by the training bound.
#
#   examples/certified_mnist.sh DATA_DIR [OUT]
#
# DATA_DIR holds the MNIST idx files (bash ../shared/data/mnist.sh DIR). Trains a CROWN-IBP teacher
# (registry cnn4, 166k parameters: one epoch at radius 0, a smoothed ramp to TEACHER_EPS over 4 epochs
# with beta 1 -> 0 and kappa 1 -> 0, then IBP at the full radius), then students of cnn4 with convolutions
# of the teacher's shape and a 15-unit dense layer (32,191 parameters, a fifth of the teacher): KD and
# KDIGA (no certified loss), certified training alone (ibp) and certified distillation (cert-kd:
# (1 - alpha) L_IBP + alpha tau^2 KL(T || S), alpha 0.5), the last two both from scratch and started from
# the teacher's convolutions (`--init`: every tensor whose name and shape match). Then IBP, CROWN and
# APGD at EPS on the first N_EVAL test points, `certkd compare` of each certified student against the
# teacher and the transfer certificate of `certkd bounds --certified-gamma` on the first N_PAIR.
# Re-running continues (--resume).
# Knobs (environment): EPS=0.1 TEACHER_EPOCHS=10 TEACHER_EPS=EPS STUDENT_EPOCHS=8 N_EVAL=1000 N_PAIR=100
# DEVICE=cpu SEED=0 PYTHON=python3
set -euo pipefail
DATA_DIR="${1:?usage: examples/certified_mnist.sh DATA_DIR [OUT]}"
OUT="${2:-runs/certified_mnist}"
EPS="${EPS:-0.1}"
TEACHER_EPOCHS="${TEACHER_EPOCHS:-10}" TEACHER_EPS="${TEACHER_EPS:-$EPS}" STUDENT_EPOCHS="${STUDENT_EPOCHS:-8}"
N_EVAL="${N_EVAL:-1000}" N_PAIR="${N_PAIR:-100}" DEVICE="${DEVICE:-cpu}" SEED="${SEED:-0}" PY="${PYTHON:-python3}"
certkd() { "$PY" -m certkd "$@"; }
mkdir -p "$OUT"
COMMON=(--dataset mnist --data-dir "$DATA_DIR" --device "$DEVICE" --seed "$SEED" --eps-start 1
        --eps-schedule smoothed --kappa-start 1 --kappa-end 0 --optimizer adam --lr 2e-3 --weight-decay 0
        --batch-size 256 --no-progress --resume)
certkd train --method crown-ibp --arch cnn4 --eps "$TEACHER_EPS" --epochs "$TEACHER_EPOCHS" --eps-warmup 4 \
    "${COMMON[@]}" --out "$OUT/teacher.pt"
STUDENT=(--arch cnn4 --arch-kwargs '{"linear": 15}' --epochs "$STUDENT_EPOCHS" --dataset mnist --data-dir "$DATA_DIR"
         --device "$DEVICE" --seed "$SEED" --optimizer adam --lr 2e-3 --weight-decay 0 --batch-size 256 --no-progress
         --resume)
SMALL=(--arch cnn4 --arch-kwargs '{"linear": 15}' --eps "$EPS" --epochs "$STUDENT_EPOCHS" --eps-warmup 3 "${COMMON[@]}")
# distillation without a certified loss, for comparison: KD, and KDIGA with its gradients aligned at x
certkd train --method kd --teacher "$OUT/teacher.pt" "${STUDENT[@]}" --out "$OUT/kd.pt"
certkd train --method kdiga --teacher "$OUT/teacher.pt" --iga-weight 1 "${STUDENT[@]}" --out "$OUT/kdiga.pt"
STUDENTS=()
for init in scratch teacher; do
    INIT=()
    [ "$init" = teacher ] && INIT=(--init "$OUT/teacher.pt")
    certkd train --method ibp "${SMALL[@]}" "${INIT[@]}" --out "$OUT/ibp_$init.pt"
    certkd train --method cert-kd --teacher "$OUT/teacher.pt" --alpha 0.5 "${SMALL[@]}" "${INIT[@]}" \
        --out "$OUT/certkd_$init.pt"
    STUDENTS+=("ibp_$init" "certkd_$init")
done
for model in teacher kd kdiga "${STUDENTS[@]}"; do
    certkd certify "$OUT/$model.pt" --data-dir "$DATA_DIR" -n "$N_EVAL" --eps "$EPS" --method ibp,crown,apgd \
        --out "$OUT/$model.certify.json" --per-example "$OUT/$model.certify.jsonl" --resume --no-progress
done
for student in "${STUDENTS[@]}"; do
    certkd compare "$OUT/$student.pt" "$OUT/teacher.pt" --data-dir "$DATA_DIR" -n "$N_PAIR" --method crown \
        --out "$OUT/$student.compare" --resume --no-progress
    certkd bounds "$OUT/$student.pt" "$OUT/teacher.pt" --data-dir "$DATA_DIR" -n "$N_PAIR" --eps "$EPS" \
        --certified-gamma --method crown --out "$OUT/$student.bounds" --resume --no-progress
done
