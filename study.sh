#!/usr/bin/env bash
# The study over training-set sizes, training lengths and seeds, at two scales, and the map of where
# "memorize in training, generalize in inference" holds (figures.py's claim3_map: copies and the trajectory
# score against the peak of G, one curve per n).
#   bash study.sh --scale cpu [--out DIR] [--jobs J] [--ns "32 64 128 256 512"] [--base-ns "32 64 128"] [--seeds "0 1 2"]
#   bash study.sh --scale gpu [--out DIR] [--data-dir DIR] [--jobs J] [--sizes "xs s m"] [--ns "256 1024 4096"]
#   bash study.sh --scale cpu --factors [--out DIR]      # claim 5 on a CPU: model size, conditioning, guidance
#   bash study.sh --scale cpu|gpu --device cpu --tiny   # the same stages at tiny settings on a CPU (a minute or two)
#
# --scale cpu (about 4 hours on 2 CPU cores, see docs/results.md): Fashion-MNIST at 16x16, the quick run's U-Net
#   (tiny preset, 24 channels) and recipe (2,400 steps of batch 32: 76,800 images; snapshots at 6 log-spaced
#   counts and every 25,600 images) in two arms: the plain recipe on n = --ns training images, with --seeds
#   training seeds for the --headline-ns sizes (32 128 256 512) and seed 0 for the others, and the authors' base
#   model (class-conditional, EDM's augmentation at p = 0.12, dropout 0.13) on n = --base-ns with every seed; per
#   run: eval_gap (128 images per split, 16 sigmas, --optimal) and sample_memorize (512 samples per snapshot from
#   --sample-from images seen on, unguided, labels drawn as the training set's; the trajectory measures with
#   their intervals at the fixed probe sigmas and at each snapshot's peak of G); --jobs runs at once (2, one per
#   core); figures.
# --scale cpu --factors (claim 5, about 3 hours on 2 CPU cores): the map's network and recipe on n = --factor-n (128)
#   images, varied in one factor at a time, into the same OUT (the map's runs of that n are shared, not trained twice):
#   1. model size: U-Nets of --factor-channels (8 24 48) base channels (0.08M, 0.71M, 2.8M parameters), every seed;
#   2. conditioning granularity: the dataset's classes (every seed), k-means labels of --factor-ks (10 32 128) clusters
#      in pixels and of --factor-feature-ks (10 32) in classifier features, every seed; unconditional: the size runs
#      of 24 channels;
#   3. guidance: the class-conditional run of seed 0 guided at w = 0, 0.2, ..., 2 (eval_gap and sample_memorize of its
#      last snapshot, and of its last snapshot of at most a third of the training, in the paper's regime of G) by an
#      unconditional run trained 10x shorter (classifier-free guidance with the paper's CIFAR-10 negative) and by a
#      class-conditional run trained 10x shorter (autoguidance).
# --scale gpu (the one-GPU study, about 70 minutes on one H100/H200; gpu.sh runs it): Fashion-MNIST at 32x32.
#   Stages, each in OUT:
#   1. grid: U-Net sizes --sizes crossed with training set sizes --ns, unconditional, --images images
#      each (1M: 3,900 steps of batch 256), 8 log-spaced snapshots; two k-means conditioned runs
#      (size s, n 1024, k 10 and 100, label dropout 0.1 for the null label) and their guidance negative,
#      an unconditional run of the same size and n trained 10x shorter (the paper's CFG negative: 20M of 200M
#      images); per run, after training: eval_gap (64 sigmas, 2,048 images per split; the conditioned runs' last
#      snapshot guided by the null label at w = 0, 0.2, ..., 2) and sample_memorize (1,024 samples per snapshot,
#      the trajectory measures). Runs are independent: --jobs of them share the GPU at once (small networks
#      leave most of it idle).
#   2. guidance with the weaker negative: the conditioned runs' last snapshot guided by the short unconditional
#      run at the same weights, beside the null-label variant of stage 1.
#   3. receptive field and long-range dependence on the last snapshot of one run (size m, the smallest n):
#      eval_gap with windows of 16, 20, 24, 28 pixels (on the U-Net's 4-pixel grid, unpadded) and the Jacobian
#      correlation radius at the authors' settings (16 sigmas in [2e-3, 80], 32 images per split, all pixels).
#   4. figures.py OUT -> OUT/figures, and the time of every stage in OUT/gpu.log.
# Planned time, from rates measured on one H200 (torch 2.11, bf16, batch 256, eager): training 1M images
# takes 3.5 min for s (4,829 img/s), 5.5 min for m (3,040), about 2.5 for xs: 42 min for the eleven runs
# one after another (the short negative adds 0.4); eval_gap at about 9,200 image-sigmas/s for m (28 s per
# snapshot): about 25 min for the runs' 8 snapshots; the 11 guidance weights cost about 2 forward passes each,
# about 5 min per guided evaluation of an s snapshot, 20 min for the four; windows about 5 min; the Jacobian
# radius at the authors' settings (1,024 vector-Jacobian products per image, 32 images x 2 splits x 16 sigmas)
# roughly 6 min. About 100 minutes one job at a time at eager rates; the compiled default and 4 jobs sharing the
# GPU should bring it to about 70. Unmeasured end to end on a GPU so far: the log's stage times are the measurement.
#
# Options: --scale cpu|gpu (gpu), --device DEV (cpu at cpu scale, cuda at gpu scale), --tiny, --data-dir DIR (or
# DATA_DIR), --out DIR (results/study-cpu; results/gpu), --jobs J (2; 4 at gpu scale; 2 with --tiny), --sizes, --ns,
# --seeds, --headline-ns (sizes that get every seed), --base-ns (cpu scale: the base model's sizes), --images N
# (images seen per run), --factors (cpu scale: claim 5's factors instead of the map), --factor-n, --factor-channels,
# --factor-ks, --factor-feature-ks, --sample-from N (cpu scale: snapshots of fewer images seen are evaluated, not sampled:
# 3,000), --precision auto|fp32|bf16 (training and the networks' inference; auto: bf16 on CUDA and on CPUs with
# bf16 units, else fp32). A failed run is logged and the study goes on; the exit status is then 1. --eager:
# --step-mode and --forward-mode eager (nothing compiled).
# The dataset is read (and, if need be, downloaded) once before the jobs start; torch.compile's compile workers
# are shared out among the jobs (TORCHINDUCTOR_COMPILE_THREADS = cores / jobs, unless set). Rerunning the same command resumes: training resumes from the last
# snapshot, and the evaluations reuse the rows they already wrote.
set -euo pipefail
source "$(dirname "$0")/jobs.sh"  # --out, --data-dir and PYTHON as given from this folder, before the cd
PY=$(program "${PYTHON:-python3}")  # the Python with the requirements: PYTHON=venv/bin/python bash study.sh
cd "$(dirname "$0")"
SCALE=gpu DEVICE="" TINY=0 EAGER=0 OUT="" DATA_DIR=${DATA_DIR:-} JOBS="" SIZES="" NS="" IMAGES="" SEEDS="" HEADLINE_NS=""
SAMPLE_FROM="" PRECISION=auto FACTORS=0  # BASE_NS stays unset unless given: --base-ns "" runs no base model
FACTOR_N="" FACTOR_CHANNELS=""  # FACTOR_KS and FACTOR_FEATURE_KS stay unset unless given, as BASE_NS
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1; shift ;;
        --factors) FACTORS=1; shift ;;
        --eager) EAGER=1; shift ;;
        --scale|--device|--data-dir|--out|--jobs|--sizes|--ns|--images|--seeds|--headline-ns|--base-ns|--sample-from|\
        --precision|--factor-n|--factor-channels|--factor-ks|--factor-feature-ks)
            # --data-dir DIR sets DATA_DIR, and so on
            [ $# -ge 2 ] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
            name=${1#--}; name=${name//-/_}; printf -v "${name^^}" %s "$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$SCALE" in cpu|gpu) ;; *) echo "error: --scale must be cpu or gpu, got $SCALE" >&2; exit 2 ;; esac
[ -z "$OUT" ] || OUT=$(absolute "$OUT")
[ -z "$DATA_DIR" ] || DATA_DIR=$(absolute "$DATA_DIR")
case "$PRECISION" in auto|fp32|bf16) ;; *) echo "error: --precision must be auto, fp32 or bf16, got $PRECISION" >&2; exit 2 ;; esac
if ! PY_INFO=$("$PY" -c 'import sys, torch; print(sys.executable, "with torch", torch.__version__)' 2>/dev/null); then
    echo "error: $PY cannot import torch: set PYTHON to the Python that has the requirements" \
         "(e.g. PYTHON=venv/bin/python), or install them (python3 -m pip install -r requirements.txt)" >&2
    exit 2
fi
if [ "$SCALE" = cpu ]; then  # the map on a CPU: the quick run's network and recipe over n, length and seeds
    DEVICE=${DEVICE:-cpu} OUT=${OUT:-results/study-cpu} JOBS=${JOBS:-2} SIZES=${SIZES:-tiny} RES=16 KS=""
    WINDOWS=() KSIZE="" WINDOW_RUN_SIZE="" TRAIN=(--lr 2e-3 --lr-rampup 0)
    BASE=(--cond class --augment-p 0.12 --dropout 0.13)  # the authors' base model
    if [ "$TINY" = 1 ]; then
        BATCH=8 IMAGES=${IMAGES:-160} NS=${NS:-"16 32"} SEEDS=${SEEDS:-"0 1"} HEADLINE_NS=${HEADLINE_NS:-16}
        BASE_NS=${BASE_NS-16} SAMPLE_FROM=${SAMPLE_FROM:-0} FACTOR_N=${FACTOR_N:-16}
        FACTOR_CHANNELS=${FACTOR_CHANNELS:-"4 8"} FACTOR_KS=${FACTOR_KS-"4 16"} FACTOR_FEATURE_KS=${FACTOR_FEATURE_KS-4}
        NET=(--channels 8) NAME_SIZE=c8 SNAPSHOTS=log:2
        EVAL=(--num-images 8 --num-sigmas 4 --batch 32)
        SAMPLE=(--num-samples 4 --steps 3 --probe-sigmas 1 --fd-subsets 2 --features builtin)
    else
        BATCH=32 IMAGES=${IMAGES:-76800} NS=${NS:-"32 64 128 256 512"} SEEDS=${SEEDS:-"0 1 2"}
        HEADLINE_NS=${HEADLINE_NS:-"32 128 256 512"} BASE_NS=${BASE_NS-"32 64 128"} SAMPLE_FROM=${SAMPLE_FROM:-3000}
        FACTOR_N=${FACTOR_N:-128} FACTOR_CHANNELS=${FACTOR_CHANNELS:-"8 24 48"} FACTOR_KS=${FACTOR_KS-"10 32 128"}
        FACTOR_FEATURE_KS=${FACTOR_FEATURE_KS-"10 32"}
        NET=(--channels 24) NAME_SIZE=c24 SNAPSHOTS=log:6,every:25600
        TRAIN+=(--eval-every 12800)
        EVAL=(--num-images 128 --num-sigmas 16)
        SAMPLE=(--num-samples 512)
    fi
    OPTIMAL=(--optimal)  # beside every run's snapshots
else  # the one-GPU study
    DEVICE=${DEVICE:-cuda} OUT=${OUT:-results/gpu} SEEDS=${SEEDS:-0} HEADLINE_NS=${HEADLINE_NS:-} NAME_SIZE="" TRAIN=()
    BASE_NS=${BASE_NS-} SAMPLE_FROM=${SAMPLE_FROM:-0} OPTIMAL=()
    if [ "$TINY" = 1 ]; then
        RES=16 BATCH=8 SIZES=${SIZES:-tiny} NS=${NS:-"16 32"} IMAGES=${IMAGES:-160} JOBS=${JOBS:-2} KS=4
        NET=(--channels 8) SNAPSHOTS=log:2 KSIZE=tiny WINDOW_RUN_SIZE=tiny
        WINDOWS=(8 12) JACOBIAN=(--jacobian-sigmas 0.5 2 --jacobian-images 4 --jacobian-pixels 8)
        EVAL=(--num-images 8 --num-sigmas 4 --batch 32)
        SAMPLE=(--num-samples 4 --steps 3 --probe-sigmas 1 --fd-subsets 2)
    else
        RES=32 BATCH=256 SIZES=${SIZES:-"xs s m"} NS=${NS:-"256 1024 4096"} IMAGES=${IMAGES:-1000000}
        JOBS=${JOBS:-4} KS="10 100" NET=() SNAPSHOTS=log:8 KSIZE=s WINDOW_RUN_SIZE=m
        WINDOWS=(16 20 24 28) JACOBIAN=(--jacobian)  # the authors' settings (eval_gap.py --help)
        EVAL=(--num-images 2048 --num-sigmas 64)
        SAMPLE=(--num-samples 1024)
    fi
fi
positive() {  # positive OPTION VALUE...: stop unless each VALUE is a positive integer
    local value
    for value in "${@:2}"; do
        [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "error: $1 takes positive integers, got '$value'" >&2; exit 2; }
    done
}
positive --jobs "$JOBS"
positive --images "$IMAGES"
positive --ns $NS
[ -z "${BASE_NS// /}" ] || positive --base-ns $BASE_NS
if [ "$FACTORS" = 1 ]; then
    [ "$SCALE" = cpu ] || { echo "error: --factors is part of --scale cpu (gpu.sh runs the GPU's factors)" >&2; exit 2; }
    positive --factor-n "$FACTOR_N"
    positive --factor-channels $FACTOR_CHANNELS
    [ -z "${FACTOR_KS// /}" ] || positive --factor-ks $FACTOR_KS
    [ -z "${FACTOR_FEATURE_KS// /}" ] || positive --factor-feature-ks $FACTOR_FEATURE_KS
fi
[[ $SAMPLE_FROM =~ ^[0-9]+$ ]] || { echo "error: --sample-from takes a non-negative integer, got '$SAMPLE_FROM'" >&2; exit 2; }
TRAIN+=(--precision "$PRECISION") EVAL+=(--precision "$PRECISION") SAMPLE+=(--precision "$PRECISION")
[ -n "${SIZES// /}" ] && [ -n "${NS// /}" ] && [ -n "${SEEDS// /}" ] || { echo "error: --sizes, --ns and --seeds must not be empty" >&2; exit 2; }
[[ "$SEEDS $HEADLINE_NS" =~ ^[0-9\ ]*$ ]] || { echo "error: --seeds and --headline-ns take non-negative integers" >&2; exit 2; }
"$PY" -c 'import sys, common, plumbing
def check(device, sizes):  # what every job would stop on, checked once before any starts
    plumbing.pick_device(device)
    unknown, presets = " ".join(s for s in sizes.split() if s not in common.NETWORK_PRESETS["unet"]), ", ".join(
        common.NETWORK_PRESETS["unet"])
    common.check(not unknown, f"--sizes {unknown}: no such U-Net size; choose from {presets}")
plumbing.run_cli(lambda: check(*sys.argv[1:]))' "$DEVICE" "$SIZES"
MODE=$([ "$EAGER" = 1 ] && echo eager || echo auto)
STEP_MODE=(--step-mode "$MODE") FORWARD_MODE=(--forward-mode "$MODE")
CORES=$(nproc 2>/dev/null || echo 1)
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( CORES / JOBS > 1 ? CORES / JOBS : 1 ))}
STEPS=$(( (IMAGES + BATCH - 1) / BATCH ))
NEG_STEPS=$(( (IMAGES / 10 + BATCH - 1) / BATCH ))  # the guidance negative: 10x shorter
WEIGHTS=(0 0.2 0.4 0.6 0.8 1 1.2 1.4 1.6 1.8 2)       # guidance weights: 0 unguided, then the paper's 0.2 to 2.0
DATA=(--data fashion-mnist --resolution "$RES")
[ -n "$DATA_DIR" ] && DATA+=(--data-dir "$DATA_DIR")
lock_out "$OUT" study.sh  # before any log is written
mkdir -p "$OUT/logs"
LOG=$OUT/$SCALE$([ "$FACTORS" = 0 ] || echo -factors).log
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress bars: a line every 30 s in the logs

last_snapshot() { ls "$1"/snapshot-*.pt 2>/dev/null | tail -n 1 || true; }
images_of() { local seen=${1##*/snapshot-}; echo $((10#${seen%.pt})); }  # images_of SNAPSHOT: its images seen
snapshots_seen() {  # snapshots_seen RUN FROM [TO]: its snapshots of FROM (to TO) images seen, in order
    local file seen
    for file in "$1"/snapshot-*.pt; do
        [ -e "$file" ] && seen=$(images_of "$file") && [ "$seen" -ge "$2" ] && [ "$seen" -le "${3:-$seen}" ] \
            && echo "$file"
    done
}

run_chain() {  # run_chain NAME plain|guided|negative TRAIN_ARGS...: train, then eval_gap and sample_memorize
    local name=$1 kind=$2 run=$OUT/runs/$1 steps=$STEPS
    shift 2
    [ "$kind" = negative ] && steps=$NEG_STEPS
    "$PY" train_image.py "${DATA[@]}" --model unet "${NET[@]}" "$@" "${TRAIN[@]}" --steps "$steps" --batch "$BATCH" \
        --snapshots "$SNAPSHOTS" --eval-every "$IMAGES" --device "$DEVICE" "${STEP_MODE[@]}" --out "$run"
    if [ "$kind" = negative ]; then  # only a guidance negative (stage 2)
        return
    elif [ "$kind" = guided ]; then  # the last snapshot: each guidance weight costs two forward passes
        "$PY" eval_gap.py "$(last_snapshot "$run")" "${EVAL[@]}" --guidance-weights "${WEIGHTS[@]}" \
            --neg uncond --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/gap/$name.npz"
    else
        "$PY" eval_gap.py "$run" "${EVAL[@]}" "${OPTIMAL[@]}" --device "$DEVICE" "${FORWARD_MODE[@]}" \
            --out "$OUT/gap/$name.npz"
    fi
    mapfile -t sampled < <(snapshots_seen "$run" "$SAMPLE_FROM")
    "$PY" sample_memorize.py "${sampled[@]}" "${SAMPLE[@]}" --gap "$OUT/gap/$name.npz" --device "$DEVICE" \
        "${FORWARD_MODE[@]}" --out "$OUT/samples/$name.npz"
}

factor_runs() {  # --factors, stage 1: the runs of each factor at n = FACTOR_N (run_chain's names: shared with the map)
    local c k seed n=$FACTOR_N
    for c in $FACTOR_CHANNELS; do  # model size (unconditional: also the conditioning factor's k = 1)
        for seed in $SEEDS; do
            start "unet-c$c-n$n-seed$seed" run_chain "unet-c$c-n$n-seed$seed" plain --size tiny --channels "$c" \
                --n "$n" --seed "$seed"
        done
    done
    for seed in $SEEDS; do  # the dataset's classes
        start "class-${NAME_SIZE}-n$n-seed$seed" run_chain "class-${NAME_SIZE}-n$n-seed$seed" plain --size tiny \
            --n "$n" --seed "$seed" --cond class
    done
    for k in $FACTOR_KS; do  # k-means labels in pixels
        for seed in $SEEDS; do
            start "kmeans$k-${NAME_SIZE}-n$n-seed$seed" run_chain "kmeans$k-${NAME_SIZE}-n$n-seed$seed" plain \
                --size tiny --n "$n" --seed "$seed" --cond kmeans --k "$k"
        done
    done
    for k in $FACTOR_FEATURE_KS; do  # ... and in classifier features
        for seed in $SEEDS; do
            start "kmeans${k}feat-${NAME_SIZE}-n$n-seed$seed" run_chain "kmeans${k}feat-${NAME_SIZE}-n$n-seed$seed" \
                plain --size tiny --n "$n" --seed "$seed" --cond kmeans --k "$k" --cluster-space classifier
        done
    done
    for cond in none class; do  # the guidance negatives: trained 10x shorter
        start "$cond-short-${NAME_SIZE}-n$n-seed0" run_chain "$cond-short-${NAME_SIZE}-n$n-seed0" negative --size tiny \
            --n "$n" --seed 0 --cond "$cond"
    done
}

factor_guidance() {  # --factors, stage 2: the class-conditional run guided by each negative at every weight, at its
    # last snapshot (guidance-TAG) and at its last of at most a third of the training (guidance-TAG-IMAGES)
    local run=$OUT/runs/class-${NAME_SIZE}-n$FACTOR_N-seed0 tag neg neg_last name
    local last=$(last_snapshot "$run") early=$(snapshots_seen "$run" 0 $((IMAGES / 3)) | tail -n 1)
    for tag in cfg:none auto:class; do
        neg=${tag#*:}-short-${NAME_SIZE}-n$FACTOR_N-seed0 tag=${tag%%:*}
        neg_last=$(last_snapshot "$OUT/runs/$neg")
        if [ -z "$last" ] || [ -z "$neg_last" ]; then
            echo "=== guidance-$tag: skipped, no snapshot of the class-conditional run or of $neg"
            FAILED+=("guidance-$tag")
            continue
        fi
        start "guidance-$tag" guided_chain "$last" "$neg_last" "guidance-$tag"
        if [ -n "$early" ] && [ "$early" != "$last" ]; then
            name=guidance-$tag-$(images_of "$early")
            start "$name" guided_chain "$early" "$neg_last" "$name"
        fi
    done
}

guided_chain() {  # guided_chain SNAPSHOT NEGATIVE NAME: eval_gap and sample_memorize at every guidance weight
    "$PY" eval_gap.py "$1" "${EVAL[@]}" --guidance-weights "${WEIGHTS[@]}" --neg "$2" --device "$DEVICE" \
        "${FORWARD_MODE[@]}" --out "$OUT/gap/$3.npz"
    "$PY" sample_memorize.py "$1" "${SAMPLE[@]}" --guidance-weights "${WEIGHTS[@]}" --neg "$2" --gap "$OUT/gap/$3.npz" \
        --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/samples/$3.npz"
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

stop_jobs_on_signals  # Ctrl-C or SIGTERM: every job's processes end too
{
    echo "study.sh --scale $SCALE on $DEVICE$([ "$TINY" = 1 ] && echo ' (tiny)'), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "python: $PY_INFO"
    if [ "$FACTORS" = 1 ]; then
        echo "factors at n = $FACTOR_N: channels $FACTOR_CHANNELS; classes; k-means k = ${FACTOR_KS:-none} in pixels," \
            "k = ${FACTOR_FEATURE_KS:-none} in classifier features; guidance w = ${WEIGHTS[*]}; seeds $SEEDS"
    else
        echo "sizes: $SIZES; n: $NS; seeds $SEEDS for n in ${HEADLINE_NS:-none}, else 0; base model: n ${BASE_NS:-none}," \
            "seeds $SEEDS"
    fi
    echo "$IMAGES images per run ($STEPS steps of batch $BATCH); $JOBS runs at once; --precision $PRECISION;" \
        "--step-mode $MODE --forward-mode $MODE; TORCHINDUCTOR_COMPILE_THREADS=$TORCHINDUCTOR_COMPILE_THREADS"
    start_stage=$SECONDS  # the dataset once, before the jobs (which would each download it)
    "$PY" -c "import sys, plumbing
plumbing.run_cli(lambda: [plumbing.load_images('fashion-mnist', s, sys.argv[1] or None) for s in ('train', 'val')])" \
        "$DATA_DIR"
    echo "=== 0. data: $((SECONDS - start_stage)) s"
    start_stage=$SECONDS
    [ "$FACTORS" = 1 ] && factor_runs && SIZES=""  # instead of the map's runs
    for size in $SIZES; do
        for n in $NS; do
            seeds=0
            [[ " $HEADLINE_NS " == *" $n "* ]] && seeds=$SEEDS
            for seed in $seeds; do
                name=unet-${NAME_SIZE:-$size}-n$n
                [ "$SCALE" = cpu ] || [ "$seed" != 0 ] && name=$name-seed$seed  # the GPU study's names stay as they were
                start "$name" run_chain "$name" plain --size "$size" --n "$n" --seed "$seed"
            done
        done
        for n in $BASE_NS; do
            for seed in $SEEDS; do
                name=base-${NAME_SIZE:-$size}-n$n-seed$seed
                start "$name" run_chain "$name" plain --size "$size" --n "$n" --seed "$seed" "${BASE[@]}"
            done
        done
    done
    n_cond=$(echo ${NS:-0} | awk '{print $(NF > 1 ? 2 : 1)}')
    neg=unet-$KSIZE-n$n_cond-uncond-short
    [ -n "$KS" ] && start "$neg" run_chain "$neg" negative --size "$KSIZE" --n "$n_cond"
    for k in $KS; do
        start "unet-$KSIZE-n$n_cond-kmeans$k" run_chain "unet-$KSIZE-n$n_cond-kmeans$k" guided --size "$KSIZE" \
            --n "$n_cond" --cond kmeans --k "$k" --label-dropout 0.1
    done
    finish_all
    echo "=== 1. grid: $((SECONDS - start_stage)) s"

    start_stage=$SECONDS
    neg_last=$(last_snapshot "$OUT/runs/$neg")
    for k in $KS; do
        name=unet-$KSIZE-n$n_cond-kmeans$k
        last=$(last_snapshot "$OUT/runs/$name")
        if [ -n "$neg_last" ] && [ -n "$last" ]; then
            start "$name-neg-short" "$PY" eval_gap.py "$last" "${EVAL[@]}" --guidance-weights "${WEIGHTS[@]}" \
                --neg "$neg_last" --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/gap/$name-neg-short.npz"
        else
            echo "=== $name-neg-short: skipped, no snapshot of $name or of $neg"
            FAILED+=("$name-neg-short")
        fi
    done
    [ "$FACTORS" = 1 ] && factor_guidance
    finish_all
    echo "=== 2. guidance: $((SECONDS - start_stage)) s"

    start_stage=$SECONDS
    window_run=$OUT/runs/unet-$WINDOW_RUN_SIZE-n${NS%% *}
    last=$(last_snapshot "$window_run")
    if [ ${#WINDOWS[@]} = 0 ]; then
        echo "=== 3. windows and jacobian: not part of the $SCALE scale"
    elif [ -n "$last" ]; then
        start windows "$PY" eval_gap.py "$last" "${EVAL[@]}" --windows "${WINDOWS[@]}" --window-steps 2 \
            --device "$DEVICE" "${FORWARD_MODE[@]}" --out "$OUT/gap/windows.npz"
        start jacobian "$PY" eval_gap.py "$last" "${EVAL[@]}" "${JACOBIAN[@]}" --device "$DEVICE" \
            "${FORWARD_MODE[@]}" --out "$OUT/gap/jacobian.npz"
        finish_all
    else
        echo "=== 3. windows and jacobian: skipped, no snapshot in $window_run"
        FAILED+=(windows jacobian)
    fi
    echo "=== 3. windows and jacobian: $((SECONDS - start_stage)) s"

    start_stage=$SECONDS
    "$PY" figures.py "$OUT" --out "$OUT/figures" || FAILED+=(figures)
    echo "=== 4. figures: $((SECONDS - start_stage)) s"
    echo
    echo "study.sh done in $SECONDS s$([ ${#FAILED[@]} = 0 ] || echo "; FAILED: ${FAILED[*]}"): results in $OUT, figures in $OUT/figures, log $LOG"
    [ ${#FAILED[@]} = 0 ]
} 2>&1 | tee "$LOG" &
wait $!  # the study runs in the background, so that the signal's trap (stop_jobs) runs at once
