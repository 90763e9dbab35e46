# Sourced by the bench scripts: N `jobqueue serve` instances with default settings on a scratch
# database, dropped and created here and dropped again on exit.
#
#   scratch_instances DB N BASE_URL LOG_PREFIX [VAR=value ...]
#
# Sets URL (the scratch database's) and defines q (one psql statement on it); returns once every
# instance listens and its start-up sweep (a claim that found nothing) is over, so that the instances
# are idle when the jobs arrive. JQ names the binary (default: the release build).
JQ=${JQ:-$(dirname "${BASH_SOURCE[0]}")/../target/release/jobqueue}
scratch_instances() {
    local db=$1 n=$2 base=$3 log=$4
    shift 4
    URL="${base%/*}/$db"
    case "$base" in *\?*) URL="${base%%\?*}"; URL="${URL%/*}/$db?${base#*\?}";; esac
    SCRATCH_BASE=$base SCRATCH_DB=$db SCRATCH_PIDS=()
    trap 'kill "${SCRATCH_PIDS[@]}" 2>/dev/null; wait 2>/dev/null; psql "$SCRATCH_BASE" -qAt -c "DROP DATABASE IF EXISTS $SCRATCH_DB WITH (FORCE)"' EXIT
    psql "$base" -qAt -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
    DATABASE_URL=$URL "$JQ" migrate >/dev/null 2>&1
    for i in $(seq 1 "$n"); do
        env "$@" DATABASE_URL="$URL" PORT=0 "$JQ" serve >"$log-$i.log" 2>&1 &
        SCRATCH_PIDS+=($!)
    done
    until [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE datname = '$db' AND application_name = 'jobqueue-listener'")" = "$n" ]; do sleep 0.2; done
    # The sweep's last statement is the claim, or the next-due lookup that follows a claim finding nothing.
    until [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE datname = '$db' AND application_name = 'jobqueue-claim'
                    AND state = 'idle' AND (query LIKE '%FOR UPDATE SKIP LOCKED%' OR query LIKE '%RECURSIVE prio%')")" = "$n" ]; do sleep 0.1; done
}
q() { psql "$URL" -qAt -c "$1"; }
