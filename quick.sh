#!/usr/bin/env bash
# The quick reproduction: every stage of the study at small scale, on a CPU.
#   bash quick.sh [OUT]        (default OUT = results/quick; about 20 minutes on 2 cores)
# Scaled down from the paper so that it runs on a laptop: Fashion-MNIST at 16x16 instead of
# CIFAR-10 at 32x32, a 0.7M-parameter U-Net instead of 56M, 2,400 steps of batch 32 (76,800 images
# seen) instead of 500M images, 128 evaluation images per split and 16 sigmas instead of 8192 and 64,
# 512 samples per snapshot. Two training sets: n = 128, where the denoiser overfits (the relative gap
# G grows far above 1) while its samples stay new images and its sampling trajectories stay near fresh
# data, which is the paper's headline; and n = 32, the extreme where the samples copy training images.
# The two run side by side (one core each). Two reference samplers calibrate the measures: the optimal
# denoiser of the 32 images (copies every time) and the Gaussian denoiser of the training split (generalizes).
# Every number comes with a 95% interval (samples, evaluation images, reference draws); study.sh --scale cpu
# adds training seeds and more n.
set -euo pipefail
source "$(dirname "$0")/jobs.sh"  # OUT and PYTHON as given from this folder, before the cd
OUT=${1:+$(absolute "$1")}
PY=$(program "${PYTHON:-python3}")  # the Python with the requirements: PYTHON=venv/bin/python bash quick.sh
cd "$(dirname "$0")"
OUT=${OUT:-results/quick}  # by default in the repository
if ! PY_INFO=$("$PY" -c 'import sys, torch; print(sys.executable, "with torch", torch.__version__)' 2>/dev/null); then
    echo "error: $PY cannot import torch: set PYTHON to the Python that has the requirements" \
         "(e.g. PYTHON=venv/bin/python), or install them (python3 -m pip install -r requirements.txt)" >&2
    exit 2
fi
echo "python: $PY_INFO"
[ ! -e "$OUT" ] || [ -d "$OUT" ] || { echo "error: $OUT is a file, not a folder: give quick.sh another OUT" >&2; exit 2; }
lock_out "$OUT" quick.sh  # before any log is written
STEPS=${STEPS:-2400}
PRECISION=${PRECISION:-auto}  # training and network inference: auto (bf16 on CPUs with bf16 units, else fp32), fp32, bf16
DATA="--data fashion-mnist --resolution 16"
THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))  # per pipeline: two run at once
echo "quick.sh with $PY, $THREADS thread(s) per pipeline, --precision $PRECISION, results in $OUT"

pipeline() {  # pipeline N: train on n = N images, then the gap and the samples of every snapshot
    local run="unet-c24-n$1"
    "$PY" train_image.py $DATA --model unet --size tiny --channels 24 --n "$1" --steps "$STEPS" --threads "$THREADS" \
        --precision "$PRECISION" --batch 32 --lr 2e-3 --lr-rampup 0 --snapshots log:6 --eval-every 12800 \
        --out "$OUT/runs/$run"
    "$PY" eval_gap.py "$OUT/runs/$run" --optimal --num-images 128 --num-sigmas 16 --threads "$THREADS" \
        --precision "$PRECISION" --out "$OUT/gap/$run.npz"
    "$PY" sample_memorize.py "$OUT/runs/$run" --num-samples 512 --threads "$THREADS" --precision "$PRECISION" \
        --gap "$OUT/gap/$run.npz" --out "$OUT/samples/$run.npz"  # probed also where each snapshot's gap peaks
}

references() {  # the two reference samplers, probed also at 0.14, where the networks' gaps peak; the first of them
    # trains the classifier features once (cached)
    "$PY" sample_memorize.py --optimal $DATA --n 32 --num-samples 512 --peak-sigma 0.14 --threads "$THREADS" \
        --out "$OUT/samples/optimal-n32.npz"
    "$PY" sample_memorize.py --gaussian $DATA --n 128 --num-samples 512 --peak-sigma 0.14 --threads "$THREADS" \
        --out "$OUT/samples/gaussian-n128.npz"
}

stages() {  # the toy study and the reference samplers, the two pipelines, the figures
    mkdir -p "$OUT/logs"
    references > "$OUT/logs/references.log" 2>&1 & refs=$!  # beside the toy study, one core each
    "$PY" toy2d.py all --out "$OUT/toy2d"
    wait "$refs" || { echo "error: the reference samplers failed, see $OUT/logs/references.log" >&2; exit 1; }
    tail -n 1 "$OUT/logs/references.log"
    pipeline 128 > "$OUT/logs/n128.log" 2>&1 & first=$!
    pipeline 32 2>&1 | tee "$OUT/logs/n32.log"
    wait "$first" || { echo "error: the n = 128 pipeline failed, see $OUT/logs/n128.log" >&2; exit 1; }
    tail -n 3 "$OUT/logs/n128.log"
    "$PY" figures.py "$OUT"
}

stop_jobs_on_signals  # Ctrl-C or SIGTERM: every stage's processes end too
stages & wait $!  # in the background, so that the signal's trap runs at once
