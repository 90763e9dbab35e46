#!/usr/bin/env bash
# Chaos run: the proof that faults lose nothing (README, "Guarantees").
#
#   scripts/chaos.sh [--duration 60s|30m|1h] [--profile release|debug] [--seed N]
#
# Starts a private PostgreSQL cluster (its own port and data directory under target/chaos, never the
# server of DATABASE_URL, since this script restarts it), three `jobqueue serve` processes with short
# leases, remote workers (examples/worker.py, two per instance) on a queue no instance serves itself,
# and a load generator (scripts/chaos.py) that inserts jobs through the API and psql, with unique
# keys, cancels and retries. Handlers: builtin (fast), slow and flaky commands, the drill handler
# panicking on demand, and the remote workers. Faults come at random moments: kill -9 and SIGTERM of
# instances (restarted after), kill -9 of remote workers (restarted after), pg_terminate_backend of
# service connections, a fast PostgreSQL restart, and a 10-second stall of one instance
# (SIGSTOP/SIGCONT: it needs no root, and to the database, the other instances and its remote workers
# it looks like a network partition of that instance). Every change of a job's status
# is recorded by a trigger into chaos_events; at the end, after the drain, scripts/chaos.py checks the
# invariants from the database alone, prints one line of figures and fails on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
source scripts/pg.sh

duration=60s profile=release seed=${CHAOS_SEED:-$RANDOM}
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration) duration=$2; shift 2 ;;
        --profile) profile=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        *) echo "usage: scripts/chaos.sh [--duration 60s|30m|1h] [--profile release|debug] [--seed N]" >&2; exit 2 ;;
    esac
done
case $duration in
    *s) secs=${duration%s} ;;
    *m) secs=$(( ${duration%m} * 60 )) ;;
    *h) secs=$(( ${duration%h} * 3600 )) ;;
    *) echo "chaos: --duration wants 60s, 30m or 1h, got $duration" >&2; exit 2 ;;
esac
[[ $secs =~ ^[0-9]+$ && $secs -ge 10 ]] || { echo "chaos: --duration must be at least 10s" >&2; exit 2; }
case $profile in release|debug) ;; *) echo "chaos: --profile is release or debug" >&2; exit 2 ;; esac
RANDOM=$seed

dir=$top/target/chaos
data=$dir/pgdata
log() { echo "chaos: $(date -u +%H:%M:%S) $*" >&2; }

as=()
if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$data" --shell /bin/bash postgres
    as=(runuser -u postgres --)
fi
bindir=$(_pg_bindir) || { echo "chaos: PostgreSQL server binaries not found (see scripts/pg.sh)" >&2; exit 1; }

# One run at a time per checkout: a second would stop the first's cluster and delete its files. (A
# pid file rather than flock: the cluster and the instances would inherit a lock's descriptor and
# hold it after a killed run.)
mkdir -p "$top/target"
if [[ -f $top/target/chaos.pid ]] && kill -0 "$(cat "$top/target/chaos.pid")" 2>/dev/null; then
    echo "chaos: another chaos run (pid $(cat "$top/target/chaos.pid")) is using $dir; wait for it to end" >&2
    exit 1
fi
echo $$ >"$top/target/chaos.pid"

# A previous run that was killed may have left its cluster running.
if [[ -f $data/postmaster.pid ]]; then
    "${as[@]}" "$bindir/pg_ctl" -D "$data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
fi
rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/logs"

echo "== chaos: building ($profile)" >&2
if [[ $profile == release ]]; then
    cargo build --release --locked --bin jobqueue >&2
else
    cargo build --locked --bin jobqueue >&2
fi
bin=$top/target/$profile/jobqueue

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pg_port=$(free_port)
export PGHOST=127.0.0.1 PGPORT=$pg_port PGUSER=postgres PGDATABASE=chaos PGCONNECT_TIMEOUT=5
db_url="postgres://postgres@127.0.0.1:$pg_port/chaos"
psql_q() { psql -X -q -v ON_ERROR_STOP=1 -t -A "$@"; }

# --- processes and clean-up -------------------------------------------------------------------------
declare -a pids=() ports=() ids=() wpids=()
load_pid=
nworkers=6
cleanup() {
    local rc=$?
    set +e
    [[ -n $load_pid ]] && kill "$load_pid" 2>/dev/null
    for w in "${!wpids[@]}"; do
        [[ -n ${wpids[$w]} ]] && kill -KILL "${wpids[$w]}" 2>/dev/null && wait "${wpids[$w]}" 2>/dev/null
    done
    for i in 0 1 2; do
        if [[ -n ${pids[$i]:-} ]]; then
            kill -CONT "${pids[$i]}" 2>/dev/null
            kill -KILL "${pids[$i]}" 2>/dev/null
            wait "${pids[$i]}" 2>/dev/null
        fi
    done
    [[ -n $load_pid ]] && wait "$load_pid" 2>/dev/null
    if [[ -f $data/postmaster.pid ]]; then
        "${as[@]}" "$bindir/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || "${as[@]}" "$bindir/pg_ctl" -D "$data" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the private cluster ----------------------------------------------------------------------------
mkdir -p "$data"
[[ ${#as[@]} -gt 0 ]] && chown postgres "$data"
chmod 700 "$data"
"${as[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$dir/logs/initdb.log" 2>&1 || {
    cat "$dir/logs/initdb.log" >&2; exit 1; }
# Durability is not what is under test here (fsync=off is a scratch cluster's setting); a fast restart
# still loses no committed transaction.
"${as[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
    -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$data -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null
psql_q -d postgres -c 'CREATE DATABASE chaos' >/dev/null

# --- handlers ---------------------------------------------------------------------------------------
# Command handlers: each execution appends start and end lines to exec.log (O_APPEND, one short line
# each), and a successful one answers with its job, attempt and instance (the service's INSTANCE_ID,
# inherited), so that the checker can see that a `done` was written by the attempt that held the row.
cat >"$dir/bin/slow.sh" <<'SH'
#!/bin/sh
# Slow: 0.1 to 3.1 s, longer than the 2 s lease, so heartbeats must keep it.
cat >/dev/null
log=${CHAOS_DIR}/exec.log
echo "start $JOBQUEUE_JOB_ID $JOBQUEUE_ATTEMPT $INSTANCE_ID $(date +%s.%N)" >>"$log"
r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
sleep "$(( r % 3000 / 1000 )).$(printf %03d $(( r % 1000 )))"
sleep 0.1
echo "end $JOBQUEUE_JOB_ID $JOBQUEUE_ATTEMPT $INSTANCE_ID $(date +%s.%N)" >>"$log"
printf '{"job": "%s", "attempt": %s, "instance": "%s"}\n' "$JOBQUEUE_JOB_ID" "$JOBQUEUE_ATTEMPT" "$INSTANCE_ID"
SH
cat >"$dir/bin/flaky.sh" <<'SH'
#!/bin/sh
# Flaky: 40% retry (exit 75), 10% permanent failure (exit 1), 10% crash mid-way (SIGKILL of itself),
# 40% success after a short while.
cat >/dev/null
log=${CHAOS_DIR}/exec.log
echo "start $JOBQUEUE_JOB_ID $JOBQUEUE_ATTEMPT $INSTANCE_ID $(date +%s.%N)" >>"$log"
r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
sleep "0.$(printf %03d $(( r % 400 )))"
echo "end $JOBQUEUE_JOB_ID $JOBQUEUE_ATTEMPT $INSTANCE_ID $(date +%s.%N)" >>"$log"
case $(( r % 10 )) in
    0|1|2|3) echo "try again later" >&2; exit 75 ;;
    4) echo "permanent failure" >&2; exit 1 ;;
    5) kill -9 $$ ;;
esac
printf '{"job": "%s", "attempt": %s, "instance": "%s"}\n' "$JOBQUEUE_JOB_ID" "$JOBQUEUE_ATTEMPT" "$INSTANCE_ID"
SH
chmod +x "$dir/bin/"*.sh

cat >"$dir/jobqueue.toml" <<TOML
# Written by scripts/chaos.sh.
[queues.default]
concurrency = 4

[queues.fast]
concurrency = 4

[queues.slow]
concurrency = 4
handler = "command"
command = ["$dir/bin/slow.sh"]
timeout = "20s"

[queues.flaky]
concurrency = 4
handler = "command"
command = ["$dir/bin/flaky.sh"]
timeout = "10s"
max_attempts = 4
backoff = "200ms"
backoff_max = "1s"

# Panics on a job's first panic_attempts attempts (0 to 3, drawn by the load generator): 3 fails it.
[queues.panicky]
concurrency = 4
handler = "drill"
max_attempts = 3
backoff = "100ms"
backoff_max = "500ms"
TOML
# The queue `remote` has no entry: no instance runs its jobs; only the remote workers below claim them.

# --- instances --------------------------------------------------------------------------------------
for i in 0 1 2; do ports[$i]=$(free_port); ids[$i]=chaos-$((i + 1)); done
restarts=0
start_instance() {
    local i=$1
    CHAOS_DIR=$dir DATABASE_URL=$db_url INSTANCE_ID=${ids[$i]} PORT=${ports[$i]} BIND=127.0.0.1 \
        JOB_LEASE=2s MAINTENANCE_INTERVAL=500ms POLL_INTERVAL=500ms SHUTDOWN_TIMEOUT=2s \
        RETRY_BACKOFF=200ms RETRY_BACKOFF_MAX=2s DB_POOL_SIZE=4 \
        RETENTION_DONE=0 RETENTION_FAILED=0 RETENTION_CANCELLED=0 LOG_LEVEL=info \
        "$bin" --config "$dir/jobqueue.toml" serve >>"$dir/logs/${ids[$i]}.log" 2>&1 &
    pids[$i]=$!
}
wait_ready() {
    local i=$1 n
    for n in $(seq 1 100); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
            "http://127.0.0.1:${ports[$i]}/healthz" >/dev/null 2>&1 && return 0
        kill -0 "${pids[$i]}" 2>/dev/null || { log "${ids[$i]} exited at start-up"; tail -n 20 "$dir/logs/${ids[$i]}.log" >&2; return 1; }
        sleep 0.2
    done
    log "${ids[$i]} not ready after 20 s"; return 1
}
alive() { [[ -n ${pids[$1]:-} ]] && kill -0 "${pids[$1]}" 2>/dev/null; }

# Remote workers: examples/worker.py (through `chaos.py remote`, which gives it a recording `work`),
# worker w talking to instance w % 3 only, so each rides out its instance's deaths and stalls.
start_worker() {
    local w=$1 i=$(($1 % 3))
    CHAOS_DIR=$dir JOBQUEUE_URL=http://127.0.0.1:${ports[$i]} JOBQUEUE_QUEUE=remote \
        JOBQUEUE_WORKER=remote-$((w + 1)) JOBQUEUE_LEASE_SECS=2 \
        python3 scripts/chaos.py remote --exec-log "$dir/exec.log" >>"$dir/logs/remote-$((w + 1)).log" 2>&1 &
    wpids[$w]=$!
}
worker_alive() { [[ -n ${wpids[$1]:-} ]] && kill -0 "${wpids[$1]}" 2>/dev/null; }
declare -a wexpected=()
worker_exits=0

# Any instance or worker that is not running (killed, stopped by SIGTERM, or exited by itself) is
# started again.
unexpected_exits=0
revive() {
    local i rc w
    for w in $(seq 0 $((nworkers - 1))); do
        if ! worker_alive "$w"; then
            rc=0; wait "${wpids[$w]}" 2>/dev/null || rc=$?
            if [[ ${wexpected[$w]:-0} == 0 ]]; then
                worker_exits=$((worker_exits + 1))
                log "remote-$((w + 1)) exited by itself (status $rc); restarting"; tail -n 5 "$dir/logs/remote-$((w + 1)).log" >&2
            fi
            wexpected[$w]=0
            start_worker "$w"
        fi
    done
    for i in 0 1 2; do
        if ! alive "$i"; then
            rc=0; wait "${pids[$i]}" 2>/dev/null || rc=$?
            if [[ ${expected[$i]:-0} == 0 ]]; then
                unexpected_exits=$((unexpected_exits + 1))
                log "${ids[$i]} exited by itself (status $rc); restarting"
            fi
            expected[$i]=0
            start_instance "$i"
            restarts=$((restarts + 1))
        fi
    done
}
declare -a expected=(0 0 0)

# Migrate first, then add the recording trigger: it lives only in the chaos database, never in the
# product's migrations.
DATABASE_URL=$db_url "$bin" migrate >"$dir/logs/migrate.log" 2>&1 || { cat "$dir/logs/migrate.log" >&2; exit 1; }
psql_q -f scripts/chaos.sql >/dev/null
for i in 0 1 2; do start_instance "$i"; done
for i in 0 1 2; do wait_ready "$i"; done
for w in $(seq 0 $((nworkers - 1))); do start_worker "$w"; done

# --- load and faults --------------------------------------------------------------------------------
urls=$(printf 'http://127.0.0.1:%s,' "${ports[@]}")
python3 scripts/chaos.py load --urls "${urls%,}" --duration "$secs" --out "$dir/accepted.tsv" \
    --seed "$seed" >"$dir/logs/load.log" 2>&1 &
load_pid=$!
log "seed=$seed duration=${secs}s postgres=127.0.0.1:$pg_port instances=${ports[*]}"

declare -A faults=([kill9]=0 [term]=0 [pgkill]=0 [pgrestart]=0 [stall]=0 [wkill]=0)
fault() {
    local kind=$1 i
    case $kind in
        wkill)
            # A remote worker dies mid-job: its lease runs out and the job goes back to the queue.
            i=$((RANDOM % nworkers)); worker_alive "$i" || return 0
            log "kill -9 remote-$((i + 1))"; wexpected[$i]=1; kill -KILL "${wpids[$i]}"
            sleep 0.$((RANDOM % 10)); revive ;;
        kill9)
            i=$((RANDOM % 3)); alive "$i" || return 0
            log "kill -9 ${ids[$i]}"; expected[$i]=1; kill -KILL "${pids[$i]}"
            sleep 0.$((RANDOM % 10)); revive ;;
        term)
            i=$((RANDOM % 3)); alive "$i" || return 0
            log "SIGTERM ${ids[$i]}"; expected[$i]=1; kill -TERM "${pids[$i]}"
            # SHUTDOWN_TIMEOUT (2 s) plus the final writes (up to 12 s), then it must be gone.
            local n; for n in $(seq 1 150); do alive "$i" || break; sleep 0.1; done
            if alive "$i"; then log "${ids[$i]} still running 15 s after SIGTERM: kill -9"; kill -KILL "${pids[$i]}"; fi
            revive ;;
        pgkill)
            local n=$((1 + RANDOM % 4))
            log "pg_terminate_backend of $n service connections"
            psql_q -d postgres -c "SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'jobqueue%' ORDER BY random() LIMIT $n) s" >/dev/null || true ;;
        pgrestart)
            log "pg_ctl restart -m fast"
            "${as[@]}" "$bindir/pg_ctl" -D "$data" -m fast -w -t 60 restart >/dev/null 2>&1 || { log "PostgreSQL restart failed"; tail -n 20 "$data/server.log" >&2; return 1; } ;;
        stall)
            i=$((RANDOM % 3)); alive "$i" || return 0
            # User-space stand-in for a network stall (which would need root for iptables or tc):
            # the process freezes, its connections stay open and say nothing, its leases expire.
            log "stall ${ids[$i]} for 10 s (SIGSTOP, then SIGCONT)"
            kill -STOP "${pids[$i]}"; sleep 10; kill -CONT "${pids[$i]}" ;;
    esac
    faults[$kind]=$((faults[$kind] + 1))
}

end=$((SECONDS + secs))
kinds=(kill9 term pgkill pgrestart stall wkill)
# Every kind once, in a random order, then at random (weighted towards the cheap ones).
order=()
for k in "${kinds[@]}"; do order+=("$((RANDOM)) $k"); done
mapfile -t first < <(printf '%s\n' "${order[@]}" | sort -n | cut -d' ' -f2)
weighted=(kill9 kill9 term term pgkill pgkill pgkill pgrestart stall wkill)
n=0
sleep 2
while (( SECONDS < end )); do
    if (( n < ${#first[@]} )); then kind=${first[$n]}; else kind=${weighted[$((RANDOM % ${#weighted[@]}))]}; fi
    n=$((n + 1))
    fault "$kind"
    revive
    pause=$((1 + RANDOM % 4))
    (( SECONDS + pause < end )) || break
    sleep "$pause"
done

# --- drain and check --------------------------------------------------------------------------------
rc=0; wait "$load_pid" || rc=$?
load_pid=
[[ $rc == 0 ]] || { log "load generator failed ($rc)"; tail -n 30 "$dir/logs/load.log" >&2; exit 1; }
revive
for i in 0 1 2; do wait_ready "$i"; done
log "faults stopped; draining"
drained=0
for _ in $(seq 1 240); do
    left=$(psql_q -c "SELECT count(*) FROM jobs WHERE status IN ('pending', 'processing') AND run_at < now() + interval '1 hour'" 2>/dev/null || echo x)
    [[ $left == 0 ]] && { drained=1; break; }
    sleep 0.5
    revive
done
[[ $drained == 1 ]] || log "not drained after 120 s ($left jobs left): the checker will say which"
# Workers first: with nothing left to claim they are idle, and a long-poll that is cut claims nothing.
for w in $(seq 0 $((nworkers - 1))); do wexpected[$w]=1; kill -TERM "${wpids[$w]}" 2>/dev/null || true; done
for w in $(seq 0 $((nworkers - 1))); do wait "${wpids[$w]}" 2>/dev/null || true; wpids[$w]=; done
for i in 0 1 2; do expected[$i]=1; kill -TERM "${pids[$i]}" 2>/dev/null || true; done
for i in 0 1 2; do
    for _ in $(seq 1 200); do alive "$i" || break; sleep 0.1; done
    alive "$i" && { log "${ids[$i]} did not stop in 20 s"; kill -KILL "${pids[$i]}"; }
    wait "${pids[$i]}" 2>/dev/null || true
    pids[$i]=
done

tail -n 3 "$dir/logs/load.log" >&2
# CHAOS_INJECT=1 proves the checker can fail: it sends one finished job back to processing by hand.
if [[ ${CHAOS_INJECT:-0} == 1 ]]; then
    log "injecting a violation (CHAOS_INJECT=1)"
    psql_q -c "UPDATE jobs SET status = 'processing', locked_by = 'intruder', locked_until = now(), finished_at = NULL WHERE id = (SELECT id FROM jobs WHERE status = 'done' LIMIT 1)" >/dev/null
fi
python3 scripts/chaos.py check --accepted "$dir/accepted.tsv" --exec-log "$dir/exec.log" \
    --faults "kill9=${faults[kill9]} term=${faults[term]} pgkill=${faults[pgkill]} pgrestart=${faults[pgrestart]} stall=${faults[stall]} wkill=${faults[wkill]}" \
    --unexpected-exits "$unexpected_exits" --worker-exits "$worker_exits"
