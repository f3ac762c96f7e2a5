#!/usr/bin/env bash
# One prepared check for a GPU session, everything logged to OUT/gpu_check.log:
#   1. bench_train: U-Net s, m, l and DiT l, eager and the default step (on CUDA: compiled, CUDA graphs);
#   2. bench_eval: eval_gap's loop and sample_memorize's sampler (U-Net s), eager and the default forward
#      passes (on CUDA: compiled, CUDA graphs);
#   3. train_image.py for about --train-seconds (steps from the rate measured in 1), with its images/s;
#   4. eval_gap.py and 5. sample_memorize.py on that run, in the default --forward-mode and eager, and how far
#      the two modes' results differ.
#
#   bash benchmarks/gpu_check.sh                                  # on the GPU (--device cuda)
#   bash benchmarks/gpu_check.sh --device cpu --tiny              # the same stages on tiny cases, CPU, ~2 min
#
# Options: --device DEV (cuda), --tiny, --data-dir DIR (or DATA_DIR; Fashion-MNIST, see README),
# --out DIR (results/gpu_check), --train-seconds S (30; 3 with --tiny). A failed stage is logged and
# the check goes on (without eval_gap and sample_memorize if training failed); the exit status is then 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the Python with the requirements: PYTHON=venv/bin/python bash benchmarks/gpu_check.sh
DEVICE=cuda TINY=0 OUT=results/gpu_check TRAIN_SECONDS="" DATA_DIR=${DATA_DIR:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --data-dir) DATA_DIR=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --train-seconds) TRAIN_SECONDS=$2; shift 2 ;;
        -h|--help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -z $TRAIN_SECONDS || $TRAIN_SECONDS =~ ^[1-9][0-9]*$ ]] || {
    echo "error: --train-seconds must be a positive integer, got '$TRAIN_SECONDS'" >&2; exit 2; }
if ! PY_INFO=$("$PY" -c 'import sys, torch; print(sys.executable, "with torch", torch.__version__)' 2>/dev/null); then
    echo "error: $PY cannot import torch: set PYTHON to the Python that has the requirements" \
         "(e.g. PYTHON=venv/bin/python), or install them (python3 -m pip install -r requirements.txt)" >&2
    exit 2
fi
DATA=(--data fashion-mnist)
[ -n "$DATA_DIR" ] && DATA+=(--data-dir "$DATA_DIR")
if [ "$TINY" = 1 ]; then
    BENCH=(--batch 4 --resolution 16 --channels 1 --matmul-size 256 --repeats 2)
    BENCH_EVAL=(--size tiny --resolution 16 --images 8 --sigmas 2 --batch 8 --steps 3 --repeats 1)
    UNET_SIZES=tiny DIT_SIZES=tiny
    TRAIN=(--model unet --size tiny --channels 8 --resolution 16 --n 16 --batch 8 --probe-images 8)
    BATCH=8 SIZE=tiny TRAIN_SECONDS=${TRAIN_SECONDS:-3}
    EVAL=(--num-images 8 --num-sigmas 2 --batch 16)
    SAMPLE=(--num-samples 4 --steps 3 --batch 4)
else
    BENCH=(--batch 512 --repeats 5)
    BENCH_EVAL=(--size s --resolution 32 --images 2048 --sigmas 8 --batch 512 --steps 18 --repeats 3)
    UNET_SIZES=s,m,l DIT_SIZES=l
    TRAIN=(--model unet --size s --resolution 32 --n 1000 --batch 512)
    BATCH=512 SIZE=s TRAIN_SECONDS=${TRAIN_SECONDS:-30}
    EVAL=(--num-images 2048 --num-sigmas 32)
    SAMPLE=(--num-samples 1024)
fi
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress bars: a line every 30 s in the log, not every 0.1 s

FAILED=()
stage() {  # stage NAME COMMAND...: run it, with its wall time; a failure is noted and the check goes on
    local start=$SECONDS status=0
    echo; echo "=== $1: ${*:2}"
    "${@:2}" || status=$?
    echo "=== $1: $((SECONDS - start)) s$([ $status = 0 ] || echo ", FAILED (exit status $status)")"
    [ $status = 0 ] || FAILED+=("$1")
    return $status
}

{
    echo "gpu_check on $DEVICE$([ "$TINY" = 1 ] && echo ' (tiny)'), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "python: $PY_INFO"
    if [ "${DEVICE%%:*}" = cuda ] && command -v nvidia-smi >/dev/null; then nvidia-smi; fi
    for mode in eager auto; do
        stage "bench unet $mode" $PY benchmarks/bench_train.py --device "$DEVICE" --model unet --sizes "$UNET_SIZES" \
            --step-mode "$mode" "${BENCH[@]}" --out "$OUT/bench-unet-$mode.npz" || true
        stage "bench dit $mode" $PY benchmarks/bench_train.py --device "$DEVICE" --model dit --sizes "$DIT_SIZES" \
            --step-mode "$mode" "${BENCH[@]}" --out "$OUT/bench-dit-$mode.npz" || true
    done
    for mode in eager auto; do
        stage "bench eval $mode" $PY benchmarks/bench_eval.py --device "$DEVICE" --forward-mode "$mode" \
            "${BENCH_EVAL[@]}" || true
    done
    # Training steps for about TRAIN_SECONDS at the rate bench_train measured for this preset's default step
    # (else its eager step; else 200 steps); at least 20.
    STEPS=$($PY -c "
import sys, numpy as np
seconds, size, batch, tables = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
for path in tables:
    try:
        t = np.load(path)
        print(max(20, round(seconds * float(t['images_per_s'][list(t['size']).index(size)]) / batch)))
        break
    except (OSError, KeyError, ValueError):
        pass
else:
    print(200)" "$TRAIN_SECONDS" "$SIZE" "$BATCH" "$OUT/bench-unet-auto.npz" "$OUT/bench-unet-eager.npz")
    RUN=$OUT/run
    if stage "train" $PY train_image.py "${DATA[@]}" "${TRAIN[@]}" --device "$DEVICE" --steps "$STEPS" \
        --lr-rampup 0 --snapshots log:3 --eval-every $((STEPS * BATCH)) --out "$RUN" --no-resume; then
        stage "eval_gap" $PY eval_gap.py "$RUN" --device "$DEVICE" "${EVAL[@]}" --force --out "$OUT/gap.npz" || true
        stage "sample_memorize" $PY sample_memorize.py "$RUN" --device "$DEVICE" "${SAMPLE[@]}" --force \
            --out "$OUT/memorize.npz" || true
        stage "eval_gap eager" $PY eval_gap.py "$RUN" --device "$DEVICE" "${EVAL[@]}" --forward-mode eager --force \
            --out "$OUT/gap-eager.npz" || true
        stage "sample_memorize eager" $PY sample_memorize.py "$RUN" --device "$DEVICE" "${SAMPLE[@]}" \
            --forward-mode eager --force --out "$OUT/memorize-eager.npz" || true
        stage "compare forward modes" $PY -c "
import sys, numpy as np
out = sys.argv[1]
gap, eager = np.load(out + '/gap.npz'), np.load(out + '/gap-eager.npz')
for key in ('e_train', 'e_val'):
    print(f'{key}: largest relative difference default/eager {np.max(np.abs(gap[key] / eager[key] - 1)):.2e}')
mem, eager = np.load(out + '/memorize.npz'), np.load(out + '/memorize-eager.npz')
print('memorized_fraction default', mem['memorized_fraction'], 'eager', eager['memorized_fraction'])
diff = np.abs(mem['samples'].astype(np.float32) - eager['samples'].astype(np.float32))
print(f'samples: median |default - eager| {np.median(diff):.2e}, largest {diff.max():.2e}')" "$OUT" || true
    fi
    echo
    if [ ${#FAILED[@]} = 0 ]; then
        echo "gpu_check done in $SECONDS s; log: $LOG"
    else
        echo "gpu_check done in $SECONDS s; FAILED: ${FAILED[*]}; log: $LOG"
        exit 1
    fi
} 2>&1 | tee "$LOG"
