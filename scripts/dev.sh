#!/usr/bin/env bash
# Run the service for development: finds or starts PostgreSQL, then `jobqueue serve` (which creates
# the database and applies migrations). Extra arguments go to jobqueue, e.g. scripts/dev.sh --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
ensure_postgres
exec cargo run --release -- "$@"
