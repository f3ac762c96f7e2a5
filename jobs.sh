# Shell functions that quick.sh and study.sh share (sourced, before they change folder): paths as given from the
# folder a script was started in, one script per output folder, and every job stopped on Ctrl-C or SIGTERM.
STARTED_IN=$PWD

absolute() {  # absolute PATH: PATH as given from the folder the script was started in
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$STARTED_IN/$1" ;;
    esac
}

program() {  # program NAME_OR_PATH: a command name as it is (looked up on the PATH), a path made absolute
    case "$1" in
        */*) absolute "$1" ;;
        *) printf '%s\n' "$1" ;;
    esac
}

lock_out() {  # lock_out OUT SCRIPT: stop unless no other SCRIPT writes the folder OUT (made if missing): an flock on
    # OUT/.SCRIPT.lock, held until this script and every job it started have ended (they inherit it)
    local lock=$1/.${2%.sh}.lock
    command -v flock >/dev/null || return 0  # no flock (not Linux): unlocked, as before
    mkdir -p "$1"
    exec 9>>"$lock"
    if ! flock -n 9; then
        echo "error: $1 is being written by another $2 (process $(cat "$lock" 2>/dev/null || true), which holds" \
             "$lock): wait for it to end, or give $2 another output folder" >&2
        exit 2
    fi
    echo "$$" > "$lock"
}

descendants() {  # descendants PID: the processes below PID, each before those it started (not this function's own)
    local child
    for child in $(pgrep -P "$1" 2>/dev/null || cat /proc/"$1"/task/*/children 2>/dev/null || true); do
        [ "$child" = "$BASHPID" ] || { echo "$child"; descendants "$child"; }
    done
}

stop_jobs() {  # stop_jobs STATUS: end every process this script started, and theirs (SIGTERM: the Python scripts keep
    # their outputs whole and log how far they got), wait up to 10 s for them to end, then exit with STATUS
    trap '' INT TERM HUP
    local pids all="" round
    for round in 1 2 3; do  # again for any job started while the first ones were being stopped
        pids=$(descendants $$)
        [ -n "$pids" ] || break
        kill -TERM $pids 2>/dev/null || true
        all="$all $pids"
        sleep 0.2
    done
    for round in $(seq 50); do
        all=$(ps -o pid= -o stat= -p "$(echo $all | tr ' ' ,)" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' || true)
        [ -n "$all" ] || break
        sleep 0.2
    done
    echo "interrupted: the running jobs were stopped$([ -z "$all" ] || echo " (processes $(echo $all) still ending)");" \
         "rerun the same command to go on (finished steps are kept and reused)" >&2
    exit "$1"
}

stop_jobs_on_signals() {  # Ctrl-C (exit status 130), SIGTERM (143) and a hangup (129) end every job (stop_jobs)
    trap 'stop_jobs 130' INT
    trap 'stop_jobs 143' TERM
    trap 'stop_jobs 129' HUP
}
