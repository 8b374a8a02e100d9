#!/usr/bin/env bash
# Reproduces RESULTS.md: trains SimCSE, MCSE and KDMCSE (configs/simcse.toml, mcse.toml,
# quickstart.toml: MiniLM, 300 steps, batch 64, seed 1234, the shared data) and evaluates the
# untrained model and each run's best checkpoint on STS12-16 (samples), STS-B and SICK-R test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-minilm.sh >/dev/null
cargo build --release --bin kdmcse
bin=target/release/kdmcse
for run in simcse mcse quickstart; do
  if [ ! -f "runs/$run/best-model/model.safetensors" ]; then
    $bin train --config "configs/$run.toml" --resume auto
  fi
done
echo "untrained $($bin eval --model models/all-MiniLM-L6-v2 --data ../shared/data --json 2>/dev/null | tail -1)"
for run in simcse mcse quickstart; do
  echo "$run $($bin eval --model "runs/$run/best-model" --data ../shared/data --json 2>/dev/null | tail -1)"
  echo "$run best STS-B dev: $(grep -o '"stsb_dev":[0-9.]*' "runs/$run/metrics.jsonl" | cut -d: -f2 | sort -n | tail -1)"
done
