#!/usr/bin/env bash
# A check of a GPU box in stages that each fit a short allocation (planned: under 6 minutes on one H100/H200,
# compilation included; unmeasured so far). Every stage runs each measurement eager and in the default mode
# (--step-mode/--forward-mode auto: on one CUDA device compiled, with CUDA graphs), appends to OUT/gpu_check.log
# and ends with the summary table of every stage in OUT so far (benchmarks/gpu_check_summary.py):
#   bench   bench_train: the U-Net s and l training steps at batch 512 in the default --precision (bf16 on CUDA),
#           their img/s and share of the bf16 matmul peak measured in the same run;
#   train   train_image.py, U-Net s, n = 1000, 32x32, batch 128, --train-steps steps (2,000): its own img/s;
#   eval    bench_eval (eval_gap's E(sigma) loop against the bare forward pass, the sampler) and eval_gap.py on the
#           last snapshot of the train stage's run, and the largest difference between the modes' results;
#   sample  sample_memorize.py on that snapshot, and the largest difference between the modes' samples.
# When the default mode fails, the eager run of the same stage stands in for it, so the later stages still run.
#
#   bash benchmarks/gpu_check.sh --stage bench      # then --stage train, eval, sample: one per allocation
#   bash benchmarks/gpu_check.sh                    # --stage all: the four in turn
#   bash benchmarks/gpu_check.sh --device cpu --tiny [--stage S]   # the same stages on tiny cases, CPU
#
# Options: --stage bench|train|eval|sample|all (all), --device DEV (cuda), --tiny, --eager (eager only:
# nothing compiled), --data-dir DIR (or DATA_DIR; Fashion-MNIST, see docs/usage.md), --out DIR (results/gpu_check),
# --train-steps N (2000; 20 with --tiny). A failed command is logged and the stage goes on; the exit status is
# then 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the Python with the requirements: PYTHON=venv/bin/python bash benchmarks/gpu_check.sh
STAGE=all DEVICE=cuda TINY=0 EAGER=0 OUT=results/gpu_check TRAIN_STEPS="" DATA_DIR=${DATA_DIR:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1; shift ;;
        --eager) EAGER=1; shift ;;
        --stage|--device|--data-dir|--out|--train-steps)  # --data-dir DIR sets DATA_DIR, and so on
            [ $# -ge 2 ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
            name=${1#--}; name=${name//-/_}; printf -v "${name^^}" %s "$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$STAGE" in
    bench|train|eval|sample) STAGES=$STAGE ;;
    all) STAGES="bench train eval sample" ;;
    *) echo "error: unknown --stage $STAGE: choose bench, train, eval, sample or all" >&2; exit 2 ;;
esac
[[ -z $TRAIN_STEPS || $TRAIN_STEPS =~ ^[1-9][0-9]*$ ]] || {
    echo "error: --train-steps must be a positive integer, got '$TRAIN_STEPS'" >&2; exit 2; }
if ! PY_INFO=$("$PY" -c 'import sys, torch; print(sys.executable, "with torch", torch.__version__)' 2>/dev/null); then
    echo "error: $PY cannot import torch: set PYTHON to the Python that has the requirements" \
         "(e.g. PYTHON=venv/bin/python), or install them (python3 -m pip install -r requirements.txt)" >&2
    exit 2
fi
DATA=(--data fashion-mnist)
[ -n "$DATA_DIR" ] && DATA+=(--data-dir "$DATA_DIR")
if [ "$TINY" = 1 ]; then
    BENCH=(--sizes tiny --batch 4 --resolution 16 --channels 1 --matmul-size 256 --repeats 2)
    BENCH_EVAL=(--size tiny --resolution 16 --images 8 --sigmas 2 --batch 8 --steps 3 --repeats 1)
    TRAIN=(--model unet --size tiny --channels 8 --resolution 16 --n 16 --batch 8 --probe-images 8)
    BATCH=8 TRAIN_STEPS=${TRAIN_STEPS:-20}
    EVAL=(--num-images 8 --num-sigmas 2 --batch 16)
    SAMPLE=(--num-samples 4 --steps 3 --batch 4)
else
    BENCH=(--sizes s,l --batch 512 --repeats 5)
    BENCH_EVAL=(--size s --resolution 32 --images 2048 --sigmas 8 --batch 512 --steps 18 --repeats 3)
    TRAIN=(--model unet --size s --resolution 32 --n 1000 --batch 128)
    BATCH=128 TRAIN_STEPS=${TRAIN_STEPS:-2000}
    EVAL=(--num-images 2048 --num-sigmas 32)
    SAMPLE=(--num-samples 1024)
fi
MODES=$([ "$EAGER" = 1 ] && echo eager || echo "default eager")
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress bars: a line every 30 s in the log, not every 0.1 s

FAILED=()
run() {  # run NAME COMMAND...: output also in OUT/NAME.txt (the summary reads it), with its wall time
    local start=$SECONDS status=0
    echo "--- $1: ${*:2}"
    "${@:2}" 2>&1 | tee "$OUT/$1.txt" || status=$?
    echo "--- $1: $((SECONDS - start)) s$([ $status = 0 ] || echo ", FAILED (exit status $status)")"
    [ $status = 0 ] || FAILED+=("$1")
    return $status
}
mode_flag() {  # mode_flag FLAG MODE: the flag for the default mode (auto) or eager
    echo "$1" "$([ "$2" = eager ] && echo eager || echo auto)"
}
trained_run() {  # the last snapshot of the train stage's run: the default mode's, else the eager one's
    for run in "$OUT/run-default" "$OUT/run-eager"; do
        if ls "$run"/snapshot-*.pt >/dev/null 2>&1; then ls "$run"/snapshot-*.pt | tail -n 1; return; fi
    done
    echo "no trained run in $OUT: run --stage train first" >&2
    return 1
}

stage_bench() {
    for mode in $MODES; do
        run "bench-$mode" $PY benchmarks/bench_train.py --device "$DEVICE" --model unet $(mode_flag --step-mode $mode) \
            --precision auto "${BENCH[@]}" --out "$OUT/bench-$mode.npz" || true
    done
}
stage_train() {
    for mode in $MODES; do
        run "train-$mode" $PY train_image.py "${DATA[@]}" "${TRAIN[@]}" --device "$DEVICE" \
            $(mode_flag --step-mode $mode) --steps "$TRAIN_STEPS" --lr-rampup 0 --snapshots log:3 \
            --eval-every $((TRAIN_STEPS * BATCH)) --out "$OUT/run-$mode" --no-resume || true
    done
}
stage_eval() {
    local trained
    trained=$(trained_run) || { FAILED+=(eval); return; }
    for mode in $MODES; do
        run "bench-eval-$mode" $PY benchmarks/bench_eval.py --device "$DEVICE" $(mode_flag --forward-mode $mode) \
            "${BENCH_EVAL[@]}" || true
        run "eval_gap-$mode" $PY eval_gap.py "$trained" --device "$DEVICE" "${EVAL[@]}" \
            $(mode_flag --forward-mode $mode) --force --out "$OUT/gap-$mode.npz" || true
    done
}
stage_sample() {
    local trained
    trained=$(trained_run) || { FAILED+=(sample); return; }
    for mode in $MODES; do
        run "sample-$mode" $PY sample_memorize.py "$trained" --device "$DEVICE" "${SAMPLE[@]}" \
            $(mode_flag --forward-mode $mode) --force --out "$OUT/memorize-$mode.npz" || true
    done
}

{
    echo
    echo "gpu_check --stage $STAGE on $DEVICE$([ "$TINY" = 1 ] && echo ' (tiny)')$([ "$EAGER" = 1 ] && echo ', eager')," \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
        "$($PY -c 'import torch; print("torch", torch.__version__)')"
    echo "python: $PY_INFO"
    if [ "${DEVICE%%:*}" = cuda ] && command -v nvidia-smi >/dev/null; then nvidia-smi; fi
    for stage in $STAGES; do
        start=$SECONDS
        echo; echo "=== stage $stage"
        "stage_$stage"
        echo "=== stage $stage: $((SECONDS - start)) s"
        echo "$stage $((SECONDS - start))" >> "$OUT/stage_times.txt"
    done
    echo
    $PY benchmarks/gpu_check_summary.py "$OUT" || FAILED+=(summary)
    if [ ${#FAILED[@]} = 0 ]; then
        echo "gpu_check --stage $STAGE done in $SECONDS s; log: $LOG"
    else
        echo "gpu_check --stage $STAGE done in $SECONDS s; FAILED: ${FAILED[*]}; log: $LOG"
        exit 1
    fi
} 2>&1 | tee -a "$LOG"
