#!/usr/bin/env bash
# Drain rate of N `jobqueue serve` instances sharing one database, with default settings.
#
#   scripts/bench-instances.sh N JOBS [DATABASE_URL]
#
# Starts N instances on a scratch database (jq_instances, dropped and created), waits until each
# listens, inserts JOBS no-op jobs in one statement, and prints JOBS / (last finished_at - the
# insert's commit). Needs a release build (cargo build --release) and psql.
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
N=${1:?instances}; JOBS=${2:?jobs}
BASE=${3:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}
JQ=${JQ:-$(dirname "$0")/../target/release/jobqueue}
DB=jq_instances
URL="${BASE%/*}/$DB"
case "$BASE" in *\?*) URL="${BASE%%\?*}"; URL="${URL%/*}/$DB?${BASE#*\?}";; esac
psql "$BASE" -qAt -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
DATABASE_URL=$URL "$JQ" migrate >/dev/null 2>&1
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; psql "$BASE" -qAt -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
for i in $(seq 1 "$N"); do DATABASE_URL=$URL PORT=0 "$JQ" serve >"/tmp/jq-instance-$i.log" 2>&1 & pids+=($!); done
q() { psql "$URL" -qAt -c "$1"; }
until [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE datname = '$DB' AND application_name = 'jobqueue-listener'")" = "$N" ]; do sleep 0.2; done
sleep 0.5 # let the start-up sweeps finish: the instances are idle when the jobs arrive
t=$(psql "$URL" -qAt -c "INSERT INTO jobs (payload) SELECT jsonb_build_object('n', i) FROM generate_series(1, $JOBS) AS i" -c "SELECT clock_timestamp()" | tail -1)
# Done when no job is pending or processing, asked through the partial indexes (a count of the whole
# partition costs the server tens of milliseconds per look at this size, beside the drain it times).
left="SELECT EXISTS (SELECT 1 FROM jobs_active WHERE status = 'pending')
             OR EXISTS (SELECT 1 FROM jobs_active WHERE status = 'processing')"
until [ "$(PGOPTIONS="$PGOPTIONS -c enable_seqscan=off" q "$left")" = "f" ]; do sleep 0.5; done
q "SELECT '$N instance(s), $JOBS jobs: ' || round($JOBS / extract(epoch FROM max(finished_at) - '$t'::timestamptz)) || ' jobs/s' FROM jobs"
