#!/usr/bin/env bash
# Latency of single jobs inserted the way a psql user inserts them, into one idle `jobqueue serve`
# with default settings: the issue's "one job inserted by psql into an idle instance".
#
#   scripts/bench-psql-latency.sh [RATE] [SECONDS] [DATABASE_URL]
#
# Starts one instance on a scratch database (jq_latency, dropped and created), waits until it listens,
# then pgbench's one client runs `INSERT INTO jobs (payload) VALUES ('{}')` RATE times a second
# (default 200) for SECONDS (default 10), each its own transaction. Prints the percentiles of
# insert to finished (`finished_at - created_at`, the database's clocks) and of its first part, insert
# to claim (`started_at - created_at`). Needs a release build (cargo build --release), psql and
# pgbench (PostgreSQL's client tools).
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
RATE=${1:-200}; SECONDS_=${2:-10}
BASE=${3:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}
PGBENCH=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1 || true)
[ -x "$PGBENCH" ] || { echo "pgbench not found (PostgreSQL's client tools)" >&2; exit 1; }
. "$(dirname "$0")/scratch-instances.sh"
scratch_instances jq_latency 1 "$BASE" /tmp/jq-latency LOG_LEVEL=warn
"$PGBENCH" -n -R "$RATE" -T "$SECONDS_" -c 1 -f <(echo "INSERT INTO jobs (payload) VALUES ('{}');") "$URL" >/dev/null
until [ "$(q "SELECT count(*) FROM jobs_active")" = "0" ]; do sleep 0.2; done
q "SELECT n || ' jobs at $RATE/s; insert to finished ms: p50 ' || round(p[1]::numeric, 2) || ', p90 ' ||
          round(p[2]::numeric, 2) || ', p99 ' || round(p[3]::numeric, 2) || '; insert to claim ms: p50 ' ||
          round(c[1]::numeric, 2) || ', p99 ' || round(c[3]::numeric, 2)
   FROM (SELECT count(*) AS n,
                percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at) * 1000) AS p,
                percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000) AS c
         FROM jobs WHERE status = 'done') s"
