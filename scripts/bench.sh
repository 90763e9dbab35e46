#!/usr/bin/env bash
# Throughput and latency benchmark (release build). Arguments go to `jobqueue bench`, e.g.
#   scripts/bench.sh --jobs 200000 --concurrency 400
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
ensure_postgres
cargo build --release --locked
exec ./target/release/jobqueue bench "$@"
