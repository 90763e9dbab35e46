#!/usr/bin/env bash
# The one test command: PostgreSQL (found or started), formatting, lints, then every test against a
# real database. Each test clones its own database from a migrated template.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
ensure_postgres

# The dashboard's browser test (tests/ui_browser.rs) drives Debian's Chromium through chromedriver.
# Installed when missing; if that fails, the test skips itself with a loud message.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "== installing chromium and chromium-driver (for the dashboard's browser test)"
    sudo=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo="sudo -n"; fi
    if ! { command -v apt-get >/dev/null \
        && $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
        echo "!!!!!!!! chromium and chromium-driver could not be installed: the browser test will be SKIPPED !!!!!!!!"
    fi
fi
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
