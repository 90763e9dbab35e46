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
