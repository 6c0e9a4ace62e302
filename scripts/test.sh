#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release -- --test-threads=2
# The crash explorer's figures (written by crates/image/tests/explorer.rs).
cat target/crash-explorer.txt target/crash-explorer-ops.txt 2>/dev/null || true
# Every figure of bench/run, in its quick mode (the goals are reported,
# not enforced here: a busy CI machine is no place to measure them).
bash bench/run --quick
