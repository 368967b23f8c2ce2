#!/usr/bin/env bash
# Sets up and runs the whole service on this machine: migrations, API, worker, beat and Flower,
# against the local PostgreSQL and Redis. Ctrl-C stops everything. Logs go to .run/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh

export DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/chat_dualwrite}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
# AUTH_SECRET and FLOWER_PASSWORD; umask 077 from here on (logs included).
. scripts/secrets.sh
API_PORT=${API_PORT:-8000}
FLOWER_PORT=${FLOWER_PORT:-5555}
FLOWER_USER=${FLOWER_USER:-admin}
# A worker silent for a minute leaves Flower's metrics, so that one killed without a goodbye
# does not count as online for the DualwriteNoWorkerSeen alert.
export FLOWER_PURGE_OFFLINE_WORKERS=${FLOWER_PURGE_OFFLINE_WORKERS:-60}

# Create the database when it does not exist yet, then migrate (the backfill runs here).
.venv/bin/python - <<'PY'
import psycopg
from sqlalchemy.engine import make_url
from app.settings import get_settings

url = make_url(get_settings().database_url)
admin = url.set(drivername="postgresql", database="postgres")
with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)).fetchone():
        conn.execute(f'CREATE DATABASE "{url.database}"')
PY
.venv/bin/alembic upgrade head

# Metrics (README, "Watching it"): the API's processes and the worker node's prefork children
# count in files of a directory of their own, emptied here before they start; the worker's main
# process serves its node's counts on WORKER_METRICS_PORT.
WORKER_METRICS_PORT=${WORKER_METRICS_PORT:-9540}
for group in api worker; do
    rm -rf "$PWD/.run/metrics/$group" && mkdir -p "$PWD/.run/metrics/$group"
done

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop INT TERM EXIT

PROMETHEUS_MULTIPROC_DIR=$PWD/.run/metrics/worker WORKER_METRICS_PORT=$WORKER_METRICS_PORT \
    WORKER_METRICS_ADDRESS=127.0.0.1 \
    .venv/bin/celery -A tasks worker --loglevel=INFO -n "worker@%h" \
    -Q dualwrite.sync,dualwrite.maintenance > .run/worker.log 2>&1 &
pids+=($!)
.venv/bin/celery -A tasks beat --loglevel=INFO -s .run/celerybeat-schedule > .run/beat.log 2>&1 &
pids+=($!)
# The rollout page (/ops/) takes Flower's user and password unless OPS_BASIC_AUTH is set,
# through the environment too.
OPS_LOGIN="user and password of OPS_BASIC_AUTH"
[ -n "${OPS_BASIC_AUTH:-}" ] || OPS_LOGIN="Flower's user and password"
OPS_BASIC_AUTH=${OPS_BASIC_AUTH:-$FLOWER_USER:$FLOWER_PASSWORD} \
    PROMETHEUS_MULTIPROC_DIR=$PWD/.run/metrics/api \
    OPS_WORKER_METRICS_URLS=${OPS_WORKER_METRICS_URLS:-http://127.0.0.1:$WORKER_METRICS_PORT/metrics} \
    .venv/bin/uvicorn app.main:app --host 127.0.0.1 --port "$API_PORT" > .run/api.log 2>&1 &
pids+=($!)
# Flower starts once the worker answers, so that it lists the worker from the start.
for _ in $(seq 1 60); do
    grep -q " ready." .run/worker.log 2>/dev/null && break
    sleep 0.5
done
# Its credentials go through the environment, as in docker-compose.yml: a command-line flag
# would show the password to every user of the machine (`ps`); an environment is the owner's.
FLOWER_BASIC_AUTH="$FLOWER_USER:$FLOWER_PASSWORD" \
    .venv/bin/celery -A tasks flower --address=127.0.0.1 --port="$FLOWER_PORT" > .run/flower.log 2>&1 &
pids+=($!)

# Ready: the API answers, and so do the database, its phase row and the broker (/readyz).
for _ in $(seq 1 60); do
    .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$API_PORT/readyz', timeout=2)" 2>/dev/null && break
    sleep 0.5
done
cat <<INFO
chat-dualwrite is running (logs in .run/; Ctrl-C stops it)
  API     http://127.0.0.1:$API_PORT   (docs at /docs, /healthz, /readyz, metrics at /metrics)
  worker  http://127.0.0.1:$WORKER_METRICS_PORT/metrics   (the worker node's metrics)
  Flower  http://127.0.0.1:$FLOWER_PORT   (user $FLOWER_USER, password $FLOWER_PASSWORD)
  rollout http://127.0.0.1:$API_PORT/ops/   ($OPS_LOGIN)
  token   $(.venv/bin/python -m app token demo-user)
  try     curl -s -X POST -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' -d '{}' http://127.0.0.1:$API_PORT/chats
INFO
wait -n "${pids[@]}"
echo "a process stopped; see .run/*.log"
