#!/usr/bin/env bash
# A real Dask cluster on this machine: one `dask scheduler` and one `dask worker` (nanny) process
# managing N worker processes, all bound to 127.0.0.1. Point the crawl at it with
#   cluster.scheduler_address: tcp://127.0.0.1:<port>      (printed by `start`)
#
#   infra/local/dask-cluster.sh start [STATE_DIR] [N_WORKERS] [PORT]   # prints the scheduler address
#   infra/local/dask-cluster.sh stop  [STATE_DIR]
#
# STATE_DIR (default .dask-local) holds pid files, logs and scheduler.json. PORT 0 (default) lets the
# OS choose. PYTHON (default .venv/bin/python) is the interpreter that has distributed installed.
set -euo pipefail

cmd=${1:-}
state=${2:-.dask-local}
nworkers=${3:-2}
port=${4:-0}
python=${PYTHON:-.venv/bin/python}

die() { echo "dask-cluster.sh: $*" >&2; exit 1; }

stop() {
    for name in worker scheduler; do
        pidfile="$state/$name.pid"
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    rm -f "$state/scheduler.json"
}

case "$cmd" in
start)
    [[ -x $python ]] || die "no Python at $python (run 'make test' or set PYTHON=...)"
    [[ $nworkers =~ ^[1-9][0-9]*$ ]] || die "N_WORKERS must be a positive integer, got '$nworkers'"
    mkdir -p "$state"
    [[ -f $state/scheduler.pid ]] && kill -0 "$(cat "$state/scheduler.pid")" 2>/dev/null \
        && die "a scheduler from $state is already running (pid $(cat "$state/scheduler.pid")); stop it first"
    rm -f "$state/scheduler.json"
    "$python" -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$port" --no-dashboard \
        --scheduler-file "$state/scheduler.json" >"$state/scheduler.log" 2>&1 &
    echo $! >"$state/scheduler.pid"
    for _ in $(seq 150); do [[ -s $state/scheduler.json ]] && break; sleep 0.2; done
    [[ -s $state/scheduler.json ]] || { stop; die "scheduler did not start; see $state/scheduler.log"; }
    "$python" -m distributed.cli.dask_worker --scheduler-file "$state/scheduler.json" --host 127.0.0.1 \
        --nworkers "$nworkers" --nthreads 1 --no-dashboard --local-directory "$state/work" \
        >"$state/worker.log" 2>&1 &
    echo $! >"$state/worker.pid"
    # Wait until every worker process has registered, so the first task sees the whole cluster.
    if ! address=$("$python" - "$state/scheduler.json" "$nworkers" <<'PY'
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="30s") as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=90)
    print(client.scheduler.address)
PY
    ); then
        stop
        die "workers did not register; see $state/worker.log"
    fi
    echo "$address"
    ;;
stop)
    stop
    ;;
*)
    die "usage: $0 start [STATE_DIR] [N_WORKERS] [PORT] | stop [STATE_DIR]"
    ;;
esac
