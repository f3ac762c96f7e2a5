#!/usr/bin/env bash
# The one-GPU study: between the CPU quick run (quick.sh) and the paper, about an hour on one H100/H200.
#   bash gpu.sh [--out DIR] [--data-dir DIR] [--jobs J] [--sizes "xs s m"] [--ns "256 1024 4096"]
#   bash gpu.sh --device cpu --tiny                # the same stages at tiny settings on a CPU (under a minute)
#
# Fashion-MNIST (built in) at 32x32. Stages, each in OUT:
#   1. grid: U-Net sizes --sizes crossed with training set sizes --ns, unconditional, --images images
#      each (1M: 3,900 steps of batch 256), 8 log-spaced snapshots; two k-means conditioned runs
#      (size s, n 1024, k 10 and 100, label dropout 0.1 for the null label); per run, after training:
#      eval_gap (64 sigmas, 2,048 images per split; the conditioned runs' last snapshot at guidance
#      w = 0, 1, 2) and sample_memorize (1,024 samples per snapshot, the trajectory measures). Runs are independent:
#      --jobs of them share the GPU at once (small networks leave most of it idle).
#   2. receptive field and long-range dependence on one run (size m, the smallest n): eval_gap with
#      windows of 16, 20, 24, 28 pixels and the Jacobian correlation radius.
#   3. figures.py OUT -> OUT/figures, and the time of every stage in OUT/gpu.log.
# Planned time, from rates measured on one H200 (torch 2.11, bf16, batch 256, eager): training 1M images
# takes 3.5 min for s (4,829 img/s), 5.5 min for m (3,040), about 2.5 for xs: 42 min for the eleven runs
# one after another; eval_gap at about 9,200 image-sigmas/s for m (28 s per snapshot): about 25 min for the
# runs' 8 snapshots; windows and Jacobian about 10 min. About 80 minutes one job at a time at eager rates;
# the compiled default and 4 jobs sharing the GPU should bring it to about an hour. Unmeasured end to end on
# a GPU so far: the log's stage times are the measurement.
#
# The dataset is read (and, if need be, downloaded) once before the jobs start; torch.compile's compile workers
# are shared out among the jobs (TORCHINDUCTOR_COMPILE_THREADS = cores / jobs, unless set).
#
# Options: --device DEV (cuda), --tiny, --eager (--step-mode and --forward-mode eager: nothing compiled),
# --data-dir DIR (or DATA_DIR), --out DIR (results/gpu), --jobs J (4; 2 with --tiny), --sizes, --ns,
# --images N (images seen per run). A failed run is logged and the study goes on; the exit status is then 1.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DEVICE=cuda TINY=0 EAGER=0 OUT=results/gpu DATA_DIR=${DATA_DIR:-} JOBS="" SIZES="" NS="" IMAGES=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1; shift ;;
        --eager) EAGER=1; shift ;;
        --device|--data-dir|--out|--jobs|--sizes|--ns|--images)  # --data-dir DIR sets DATA_DIR, and so on
            [ $# -ge 2 ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
            name=${1#--}; name=${name//-/_}; printf -v "${name^^}" %s "$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$TINY" = 1 ]; then
    RES=16 BATCH=8 SIZES=${SIZES:-tiny} NS=${NS:-"16 32"} IMAGES=${IMAGES:-160} JOBS=${JOBS:-2} KS=4
    NET=(--channels 8) SNAPSHOTS=log:2 KSIZE=tiny WINDOW_RUN_SIZE=tiny
    WINDOWS=(8 10 12 14) JACOBIAN=(--jacobian-sigmas 0.5 2 --jacobian-images 4 --jacobian-pixels 8)
    EVAL=(--num-images 8 --num-sigmas 4 --batch 32)
    SAMPLE=(--num-samples 4 --steps 3 --probe-sigmas 1 --fd-subsets 2)
else
    RES=32 BATCH=256 SIZES=${SIZES:-"xs s m"} NS=${NS:-"256 1024 4096"} IMAGES=${IMAGES:-1000000}
    JOBS=${JOBS:-4} KS="10 100" NET=() SNAPSHOTS=log:8 KSIZE=s WINDOW_RUN_SIZE=m
    WINDOWS=(16 20 24 28) JACOBIAN=(--jacobian-sigmas 0.05 0.1 0.2 0.5 1 2 5 10 --jacobian-images 64)
    EVAL=(--num-images 2048 --num-sigmas 64)
    SAMPLE=(--num-samples 1024)
fi
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --jobs must be a positive integer, got '$JOBS'" >&2; exit 2; }
STEPS=$(( (IMAGES + BATCH - 1) / BATCH ))
MODE=$([ "$EAGER" = 1 ] && echo eager || echo auto)
STEP_MODE=(--step-mode "$MODE") FORWARD_MODE=(--forward-mode "$MODE")
CORES=$(nproc 2>/dev/null || echo 1)
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( CORES / JOBS > 1 ? CORES / JOBS : 1 ))}
DATA=(--data fashion-mnist --resolution "$RES")
[ -n "$DATA_DIR" ] && DATA+=(--data-dir "$DATA_DIR")
mkdir -p "$OUT/logs"
LOG=$OUT/gpu.log
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress bars: a line every 30 s in the logs

run_chain() {  # run_chain NAME GUIDANCE TRAIN_ARGS...: train, then eval_gap and sample_memorize of the run
    local name=$1 guidance=$2 run=$OUT/runs/$1
    shift 2
    $PY train_image.py "${DATA[@]}" --model unet "$@" "${NET[@]}" --steps "$STEPS" --batch "$BATCH" \
        --snapshots "$SNAPSHOTS" --eval-every "$IMAGES" --device "$DEVICE" "${STEP_MODE[@]}" --out "$run"
    if [ "$guidance" = guided ]; then  # the last snapshot: each guidance weight costs two forward passes
        $PY eval_gap.py "$(ls "$run"/snapshot-*.pt | tail -n 1)" "${EVAL[@]}" --guidance-weights 0 1 2 \
            --neg uncond --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/gap/$name.npz"
    else
        $PY eval_gap.py "$run" "${EVAL[@]}" --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/gap/$name.npz"
    fi
    $PY sample_memorize.py "$run" "${SAMPLE[@]}" --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/samples/$name.npz"
}

FAILED=()
declare -A NAME=() START=()  # of the running jobs, by process id
finish_one() {  # wait for one job of the pool; log its time and status
    local pid status=0
    wait -n -p pid || status=$?
    echo "=== ${NAME[$pid]}: $((SECONDS - START[$pid])) s$([ $status = 0 ] || echo ", FAILED (exit status $status), see $OUT/logs/${NAME[$pid]}.log")"
    [ $status = 0 ] || FAILED+=("${NAME[$pid]}")
    unset "NAME[$pid]" "START[$pid]"
}
start() {  # start NAME COMMAND...: in the background, at most JOBS at once, output in OUT/logs/NAME.log
    while [ ${#NAME[@]} -ge "$JOBS" ]; do finish_one; done
    echo "=== $1: started, log $OUT/logs/$1.log"
    "${@:2}" > "$OUT/logs/$1.log" 2>&1 &
    NAME[$!]=$1 START[$!]=$SECONDS
}
finish_all() { while [ ${#NAME[@]} -gt 0 ]; do finish_one; done; }

{
    echo "gpu.sh on $DEVICE$([ "$TINY" = 1 ] && echo ' (tiny)'), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "sizes: $SIZES; n: $NS; $IMAGES images per run ($STEPS steps of batch $BATCH); $JOBS runs at once;" \
        "--step-mode $MODE --forward-mode $MODE;" \
        "TORCHINDUCTOR_COMPILE_THREADS=$TORCHINDUCTOR_COMPILE_THREADS"
    start_stage=$SECONDS  # the dataset once, before the jobs (which would each download it)
    $PY -c "import sys, common
common.run_cli(lambda: [common.load_images('fashion-mnist', s, sys.argv[1] or None) for s in ('train', 'val')])" \
        "$DATA_DIR"
    echo "=== 0. data: $((SECONDS - start_stage)) s"
    start_stage=$SECONDS
    for size in $SIZES; do
        for n in $NS; do
            start "unet-$size-n$n" run_chain "unet-$size-n$n" plain --size "$size" --n "$n"
        done
    done
    n_cond=$(echo $NS | awk '{print $(NF > 1 ? 2 : 1)}')
    for k in $KS; do
        start "unet-$KSIZE-n$n_cond-kmeans$k" run_chain "unet-$KSIZE-n$n_cond-kmeans$k" guided --size "$KSIZE" \
            --n "$n_cond" --cond kmeans --k "$k" --label-dropout 0.1
    done
    finish_all
    echo "=== 1. grid: $((SECONDS - start_stage)) s"

    start_stage=$SECONDS
    window_run=$OUT/runs/unet-$WINDOW_RUN_SIZE-n${NS%% *}
    last=$(ls "$window_run"/snapshot-*.pt 2>/dev/null | tail -n 1 || true)
    if [ -n "$last" ]; then
        start windows $PY eval_gap.py "$last" "${EVAL[@]}" --windows "${WINDOWS[@]}" --window-steps 2 \
            --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/gap/windows.npz"
        start jacobian $PY eval_gap.py "$window_run" "${EVAL[@]}" "${JACOBIAN[@]}" --device "$DEVICE" \
            "${FORWARD_MODE[@]}" --out "$OUT/gap/jacobian.npz"
        finish_all
    else
        echo "=== 2. windows and jacobian: skipped, no snapshot in $window_run"
        FAILED+=(windows jacobian)
    fi
    echo "=== 2. windows and jacobian: $((SECONDS - start_stage)) s"

    start_stage=$SECONDS
    $PY figures.py "$OUT" --out "$OUT/figures" || FAILED+=(figures)
    echo "=== 3. figures: $((SECONDS - start_stage)) s"
    echo
    echo "gpu.sh done in $SECONDS s$([ ${#FAILED[@]} = 0 ] || echo "; FAILED: ${FAILED[*]}"): results in $OUT, figures in $OUT/figures, log $LOG"
    [ ${#FAILED[@]} = 0 ]
} 2>&1 | tee "$LOG"
