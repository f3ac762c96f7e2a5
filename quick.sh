#!/usr/bin/env bash
# The quick reproduction: every stage of the study at small scale, on a CPU.
#   bash quick.sh [OUT]        (default OUT = results/quick; about 15 minutes on 2 cores)
# Scaled down from the paper so that it runs on a laptop: Fashion-MNIST at 16x16 instead of
# CIFAR-10 at 32x32, subsets of n = 32 and 256 images, U-Nets of 0.3M and 0.7M parameters instead
# of 56M, 600 steps of batch 32 instead of 500M images, 128 evaluation images per split and 16
# sigmas instead of 8192 and 64, 64 samples per snapshot. The small-n runs memorize within
# minutes; larger n and the smaller model overfit less: the paper's factors at toy scale.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-results/quick}
PY=${PYTHON:-python3}
STEPS=${STEPS:-600}
DATA="--data fashion-mnist --resolution 16"

$PY toy2d.py all --out "$OUT/toy2d"
for n in 32 256; do
    for channels in 16 24; do              # the tiny U-Net preset at two widths: 0.3M and 0.7M parameters
        run="unet-c$channels-n$n"
        $PY train_image.py $DATA --model unet --size tiny --channels "$channels" --n "$n" --steps "$STEPS" \
            --batch 32 --lr 2e-3 --lr-rampup 0 --snapshots log:6 --eval-every 6400 --out "$OUT/runs/$run"
        $PY eval_gap.py "$OUT/runs/$run" --optimal --num-images 128 --num-sigmas 16 --out "$OUT/gap/$run.npz"
        $PY sample_memorize.py "$OUT/runs/$run" --num-samples 64 --out "$OUT/samples/$run.npz"
    done
done
$PY sample_memorize.py --optimal $DATA --n 32 --num-samples 64 --out "$OUT/samples/optimal-n32.npz"
$PY figures.py "$OUT"
