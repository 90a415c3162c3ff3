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
#
# Storage (mlflow), through the environment at `start`:
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///STATE_DIR/mlflow/mlflow.db; e.g. postgresql://u:p@host/db
#   MLFLOW_ARTIFACTS_DESTINATION  default STATE_DIR/mlflow/artifacts; e.g. s3://bucket/prefix (S3-compatible
#                                 stores: MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)
#   prefect: PREFECT_API_DATABASE_CONNECTION_URL (e.g. postgresql+asyncpg://u:p@host/db) is honoured as is.
#
# Authentication: WITCLIP_SERVICES_AUTH=1 at `start` switches it on, with the credentials the clients use
# (the same variables the pipeline reads; nothing is written to logs or passed on a command line):
#   mlflow:  MLflow's basic-auth app; admin user MLFLOW_TRACKING_USERNAME (default admin) with password
#            MLFLOW_TRACKING_PASSWORD. Clients without credentials get HTTP 401.
#   prefect: Prefect's API auth string, PREFECT_API_AUTH_STRING ("user:password"); the server gets it as
#            PREFECT_SERVER_API_AUTH_STRING.
# `health` sends the same credentials when they are set.
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
    "$python" - "$(url)$path" "$kind" <<'PY'
import base64, os, sys, urllib.request
url, kind = sys.argv[1:]
creds = (f"{os.environ.get('MLFLOW_TRACKING_USERNAME', '')}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
         if kind == "mlflow" and os.environ.get("MLFLOW_TRACKING_PASSWORD")
         else os.environ.get("PREFECT_API_AUTH_STRING") if kind == "prefect" else None)
headers = {"Authorization": "Basic " + base64.b64encode(creds.encode()).decode()} if creds else {}
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
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
    abs=$(cd "$dir" && pwd)
    auth=${WITCLIP_SERVICES_AUTH:-0}
    if [[ $kind == mlflow ]]; then
        app=()
        if [[ $auth == 1 ]]; then
            [[ -n ${MLFLOW_TRACKING_PASSWORD:-} ]] || die "WITCLIP_SERVICES_AUTH=1 needs MLFLOW_TRACKING_PASSWORD (the admin password)"
            umask 077  # the auth config and its user store are for the server's owner only
            cat >"$abs/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$abs/basic_auth.db
admin_username = ${MLFLOW_TRACKING_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# a verified password is remembered for a minute: PBKDF2 on every request slows model uploads ~3x
auth_cache_ttl_seconds = 60
INI
            [[ -f $abs/secret_key ]] || "$python" -c 'import secrets; print(secrets.token_hex(32))' >"$abs/secret_key"
            export MLFLOW_AUTH_CONFIG_PATH="$abs/basic_auth.ini"
            export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"  # read once, to create the admin user
            MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$abs/secret_key")
            export MLFLOW_FLASK_SERVER_SECRET_KEY
            app=(--app-name basic-auth)
        fi
        setsid "$bin/mlflow" server --host 127.0.0.1 --port "$port" "${app[@]}" \
            --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$abs/mlflow.db}" \
            --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$abs/artifacts}" >"$dir/server.log" 2>&1 &
    else
        if [[ $auth == 1 ]]; then
            [[ -n ${PREFECT_API_AUTH_STRING:-} ]] || die "WITCLIP_SERVICES_AUTH=1 needs PREFECT_API_AUTH_STRING (user:password)"
            export PREFECT_SERVER_API_AUTH_STRING="$PREFECT_API_AUTH_STRING"
        fi
        # the UI must call this server's API, not the default port 4200
        PREFECT_HOME="$abs/home" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL="http://127.0.0.1:$port/api" \
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
