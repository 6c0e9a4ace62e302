#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release -- --test-threads=2
