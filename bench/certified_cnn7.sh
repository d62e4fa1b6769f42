#!/usr/bin/env bash
# CNN7 certified training on a GPU, compared with CTBench (theory.md §7; examples/README.md).
#
#   bash bench/certified_cnn7.sh SETTING DATA_DIR OUT_DIR [--device cuda] [--method ibp|crown-ibp|mtl-ibp]
#
# SETTING: cifar-2 (CIFAR-10, L-inf 2/255), cifar-8 (CIFAR-10, 8/255), mnist-0.3 (MNIST, 0.3).
# Recipe of Shi et al. (2021) as CTBench runs its IBP baseline: cnn7 with BatchNorm, IBP
# initialization, warm-up regularizers (0.5), one epoch at eps 0, a smoothed ramp, training eps
# 1.1x (CIFAR) or 0.4 (MNIST 0.3), Adam 5e-4 with x0.1 steps at 50 % and 75 % of the epochs,
# gradient clipping 10, kappa 0 after the ramp. Evaluation: CROWN on the whole test set
# (certkd certify --method crown; CTBench uses a complete verifier, so CROWN's numbers are a lower end).
#
# CTBench (Mao et al. 2024), CNN7, complete verification, certified / clean accuracy (%):
#   mnist-0.3: 93.6-93.9 / 98.8     cifar-2: 63-64.6 / 79-80     cifar-8: 35.4-35.7
# Each run prints the CROWN-certified accuracy to compare with those rows; bench/gpu_check.sh
# times one IBP and one CROWN-IBP epoch of the same model (rows ibp-epoch, crown-ibp-epoch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
    echo "usage: bash bench/certified_cnn7.sh cifar-2|cifar-8|mnist-0.3 DATA_DIR OUT_DIR [--device cuda] [--method ibp]" >&2
    exit 2
fi
SETTING=$1 DATA=$2 OUT=$3
shift 3
DEVICE=cuda METHOD=ibp
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --method) METHOD=$2; shift 2 ;;
        *) echo "certified_cnn7: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$SETTING" in
    cifar-2) DATASET=cifar10 EPS=2/255 TRAIN_EPS=2.2/255 EPOCHS=160 RAMP=80 ;;
    cifar-8) DATASET=cifar10 EPS=8/255 TRAIN_EPS=8.8/255 EPOCHS=160 RAMP=80 ;;
    mnist-0.3) DATASET=mnist EPS=0.3 TRAIN_EPS=0.4 EPOCHS=70 RAMP=20 ;;
    *) echo "certified_cnn7: SETTING must be cifar-2, cifar-8 or mnist-0.3, got '$SETTING'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
CKPT="$OUT/cnn7-$SETTING-$METHOD.pt"
start=$(date +%s)
"$PY" -m certkd train --method "$METHOD" --arch cnn7 --dataset "$DATASET" --data-dir "$DATA" --device "$DEVICE" \
    --eps "$TRAIN_EPS" --epochs "$EPOCHS" --eps-start 1 --eps-warmup "$RAMP" --eps-schedule smoothed \
    --kappa-start 1 --kappa-end 0 --ibp-init --bound-reg 0.5 --optimizer adam --lr 5e-4 --weight-decay 0 \
    --lr-schedule step --clip-grad 10 --batch-size 128 --val-eps "$EPS" --no-progress --out "$CKPT"
trained=$(date +%s)
"$PY" -m certkd certify "$CKPT" --data-dir "$DATA" --eps "$EPS" --method crown --batch-size 64 --device "$DEVICE" \
    --out "$OUT/cnn7-$SETTING-$METHOD.certify.json" --overwrite
echo "certified_cnn7 $SETTING $METHOD: training $((trained - start)) s, certification $(( $(date +%s) - trained )) s;" \
     "compare the CROWN-certified accuracy above with CTBench's row in this script's header"
