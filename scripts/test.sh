#!/usr/bin/env bash
# The one test command: PostgreSQL (found or started), formatting, lints, then every test against a
# real database. Each test clones its own database from a migrated template.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
ensure_postgres

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --no-fail-fast -- "$@"
echo "== schemathesis (the API fuzzed against its OpenAPI document)"
scripts/schemathesis.sh
# The 60-second chaos run (README, "Guarantees"): its own PostgreSQL cluster, three instances, faults.
# The debug binary the tests just built keeps CI time down; `scripts/chaos.sh --duration 30m` (release
# build by default) is the long run.
# Skipped when a test-name filter is given, or with CHAOS=0.
if [[ $# -eq 0 && ${CHAOS:-1} != 0 ]]; then
    echo "== chaos run (60 s)"
    scripts/chaos.sh --duration 60s --profile debug
fi
