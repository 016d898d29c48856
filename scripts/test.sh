#!/usr/bin/env bash
# The test command: fetch the real assets the tests use (once), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh > /dev/null
cargo test --release --workspace "$@"
