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
. "$(dirname "$0")/scratch-instances.sh"
scratch_instances jq_instances "$N" "$BASE" /tmp/jq-instance
t=$(psql "$URL" -qAt -c "INSERT INTO jobs (payload) SELECT jsonb_build_object('n', i) FROM generate_series(1, $JOBS) AS i" -c "SELECT clock_timestamp()" | tail -1)
# Done when no job is pending or processing, asked through the partial indexes (a count of the whole
# partition costs the server tens of milliseconds per look at this size, beside the drain it times).
left="SELECT EXISTS (SELECT 1 FROM jobs_active WHERE status = 'pending')
             OR EXISTS (SELECT 1 FROM jobs_active WHERE status = 'processing')"
until [ "$(PGOPTIONS="$PGOPTIONS -c enable_seqscan=off" q "$left")" = "f" ]; do sleep 0.5; done
q "SELECT '$N instance(s), $JOBS jobs: ' || round($JOBS / extract(epoch FROM max(finished_at) - '$t'::timestamptz)) || ' jobs/s' FROM jobs"
