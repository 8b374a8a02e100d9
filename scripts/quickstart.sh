#!/usr/bin/env bash
# The main job, on CPU with the local defaults: fetch MiniLM, build, train configs/quickstart.toml
# (KDMCSE, 300 steps, checkpoints and metrics under runs/quickstart/), then evaluate the best
# checkpoint on the STS tasks. Extra arguments go to `kdmcse train` (e.g. --set train.max_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-minilm.sh
scripts/install-build-deps.sh
cargo build --release --workspace
target/release/kdmcse train --config configs/quickstart.toml "$@"
target/release/kdmcse eval --model runs/quickstart/best-model --data ../shared/data
