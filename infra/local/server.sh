#!/usr/bin/env bash
# Real MLflow and Prefect servers on this machine, bound to 127.0.0.1, for the pipeline to use instead
# of its embedded defaults (sqlite file, Prefect's ephemeral API):
#
#   infra/local/server.sh start  mlflow|prefect [STATE_DIR] [PORT]   # prints the server's URL
#   infra/local/server.sh health mlflow|prefect [STATE_DIR]          # exit 0 when it answers
#   infra/local/server.sh stop   mlflow|prefect [STATE_DIR]
#
# mlflow: `mlflow server` with a sqlite store and a local artifact root under STATE_DIR; point the
#         pipeline at it with mlflow.tracking_uri: <URL> (configs/local-services.yaml).
# prefect: `prefect server start` with PREFECT_HOME under STATE_DIR; point the pipeline at it with
#         PREFECT_API_URL=<URL>/api in the environment.
# STATE_DIR defaults to .services-local; PORT defaults to 5000 (mlflow) / 4200 (prefect), 0 = any free
# port. PYTHON (default .venv/bin/python) is the interpreter that has mlflow and prefect installed.
set -euo pipefail

cmd=${1:-}
kind=${2:-}
state=${3:-.services-local}
python=${PYTHON:-.venv/bin/python}

die() { echo "server.sh: $*" >&2; exit 1; }
[[ $kind == mlflow || $kind == prefect ]] || die "usage: $0 start|health|stop mlflow|prefect [STATE_DIR] [PORT]"
dir="$state/$kind"
bin=$(cd "$(dirname "$python")" && pwd)

url() { cat "$dir/url"; }

health() {
    [[ -f $dir/url ]] || return 1
    local path=/health
    [[ $kind == prefect ]] && path=/api/health
    "$python" - "$(url)$path" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

stop() {
    if [[ -f $dir/pid ]]; then
        pid=$(cat "$dir/pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true  # the server and its workers
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        rm -f "$dir/pid"
    fi
    rm -f "$dir/url"
}

case "$cmd" in
start)
    [[ -x $python ]] || die "no Python at $python (run 'make test' or set PYTHON=...)"
    port=${4:-}
    [[ -n $port ]] || { [[ $kind == mlflow ]] && port=5000 || port=4200; }
    if [[ $port == 0 ]]; then
        port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    mkdir -p "$dir"
    [[ -f $dir/pid ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null && die "$kind from $dir is already running; stop it first"
    echo "http://127.0.0.1:$port" >"$dir/url"
    export PATH="$bin:$PATH"  # mlflow execs uvicorn/gunicorn by name
    if [[ $kind == mlflow ]]; then
        setsid "$bin/mlflow" server --host 127.0.0.1 --port "$port" \
            --backend-store-uri "sqlite:///$(cd "$dir" && pwd)/mlflow.db" \
            --artifacts-destination "$(cd "$dir" && pwd)/artifacts" >"$dir/server.log" 2>&1 &
    else
        PREFECT_HOME="$(cd "$dir" && pwd)/home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
            setsid "$bin/prefect" server start --host 127.0.0.1 --port "$port" >"$dir/server.log" 2>&1 &
    fi
    echo $! >"$dir/pid"
    for _ in $(seq 300); do health && break; kill -0 "$(cat "$dir/pid")" 2>/dev/null || break; sleep 0.3; done
    health || { stop; die "$kind server did not come up on port $port; see $dir/server.log"; }
    url
    ;;
health)
    health || die "$kind server from $dir does not answer"
    ;;
stop)
    stop
    ;;
*)
    die "usage: $0 start|health|stop mlflow|prefect [STATE_DIR] [PORT]"
    ;;
esac
