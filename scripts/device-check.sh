#!/usr/bin/env bash
# The GPU check, in two halves, for a GPU machine without network or Rust toolchain:
#
#   scripts/device-check.sh prepare     # here: builds the CUDA binaries (scripts/build-cuda.sh)
#                                       # and packs .device-check/ (binaries, tokenizer, a slice
#                                       # of ../shared/data) to travel to the GPU machine
#   scripts/device-check.sh run [DIR]   # there, from the repository root, with .device-check/
#                                       # beside it: writes DIR/device-check.json (default $OUT,
#                                       # else .device-check/out), under 10 minutes on one H100
#
# `run` does, on a random-weight BERT-base student (made with transformers, seed 0):
#   (a) `kdmcse-launch --gpus 1` training, SimCSE step at batch 64 x 2 views, max_len 32, in
#       fp32, tf32 and bf16: median step time, sentences/s, peak GPU memory (nvidia-smi), and
#       the median forward / backward / update split (train.phase_timings), and (c) below,
#       both through scripts/bench-vs-torch;
#   (b) `kdmcse check` as a launched world of one on the GPU: NCCL communicator made through the
#       rendezvous store, every collective checked, dropout masks and a small random encoder's
#       forward and gradients against the CPU (fp32, bf16);
#   (c) the same step in PyTorch (scripts/torch_reference_step.py) for the side-by-side ratio;
# and writes one JSON summary (device-check.json) with the checks, the ratios and the model FLOP
# utilisation, beside the log, check.jsonl and the runs' metrics.
# The binaries find cuBLAS, cuRAND, NVRTC, NCCL and the CUDA runtime in the machine's PyTorch
# install (its nvidia-* cu13 wheels) through LD_LIBRARY_PATH, and libcuda.so.1 from the driver.
# Knobs: KDMCSE_CHECK_STEPS (50; the first fifth are warm-up, left out of the timings) and
# KDMCSE_CHECK_TIMEOUT (seconds per training run, 75: the whole script must end within the
# GPU machine's 10-minute command limit). A dry run of `run` on a CPU machine, to test this
# script: KDMCSE_CHECK_DEVICE=cpu KDMCSE_CHECK_BIN=target/release KDMCSE_CHECK_STEPS=7
# KDMCSE_CHECK_TIMEOUT=900 KDMCSE_CHECK_LAYERS=2 (a 2-layer "BERT-base"), with PyTorch and
# transformers installed.
set -euo pipefail
cd "$(dirname "$0")/.."
pack=.device-check
mode="${1:-}"

prepare() {
  scripts/build-cuda.sh
  scripts/fetch-minilm.sh >/dev/null
  local shared="${KDMCSE_SHARED:-../shared}"
  rm -rf "$pack" && mkdir -p "$pack/bin" "$pack/tokenizer" "$pack/data/stsb"
  # Stripped and compressed (the CUDA kernels' PTX makes kdmcse ~70 MB), to fit a 64 MiB carry.
  for bin in kdmcse kdmcse-launch; do
    strip -o "$pack/bin/$bin" "target/cuda/release/$bin"
    gzip -9 "$pack/bin/$bin"
  done
  for f in tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
    cp "models/all-MiniLM-L6-v2/$f" "$pack/tokenizer/" # bert-base-uncased's vocabulary
  done
  cp "$shared/data/wiki/wiki1m_head_11913.txt" "$pack/data/wiki.txt"
  cp "$shared/data/stsb/sts-dev.csv" "$pack/data/stsb/"
  du -sh "$pack"
  echo "carry $pack to the GPU machine and run: bash scripts/device-check.sh run \"\$OUT\""
}

run() {
  local out="${1:-${OUT:-$pack/out}}"
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  exec > >(tee "$out/device-check.log") 2>&1
  local work=/tmp/kdmcse-device-check
  rm -rf "$work" && mkdir -p "$work"
  local device="${KDMCSE_CHECK_DEVICE:-cuda}" steps="${KDMCSE_CHECK_STEPS:-50}" bin="$work/bin"
  local limit="${KDMCSE_CHECK_TIMEOUT:-75}" layers="${KDMCSE_CHECK_LAYERS:-12}"
  mkdir -p "$bin"
  if [ -n "${KDMCSE_CHECK_BIN:-}" ]; then
    cp "$KDMCSE_CHECK_BIN"/kdmcse "$KDMCSE_CHECK_BIN"/kdmcse-launch "$bin/"
  else
    for b in kdmcse kdmcse-launch; do gunzip -c "$pack/bin/$b.gz" >"$bin/$b" && chmod +x "$bin/$b"; done
  fi
  export RUST_LOG="${RUST_LOG:-info}"

  # The CUDA libraries of the machine's PyTorch (nvidia/*/lib of its site-packages).
  LD_LIBRARY_PATH="$(python3 - <<'EOF'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = sorted({os.path.dirname(p) for root in nvidia.__path__ for p in glob.glob(os.path.join(root, "*", "lib", "lib*.so*"))})
print(":".join(dirs))
EOF
)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  if ldd "$bin/kdmcse" | grep "not found"; then
    echo "device-check: libraries above are missing (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2
    exit 1
  fi
  if [ "$device" = cpu ]; then
    echo "cpu (dry run), $(nproc) cores" | tee "$work/gpu.txt"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$work/gpu.txt"
  fi

  # Random-weight students with bert-base-uncased's vocabulary: BERT-base for the timings, a
  # 4-layer one for the CPU comparison (its CPU side must stay quick).
  python3 - "$work" "$pack/tokenizer" "$layers" <<'EOF'
import shutil, sys, torch, transformers
work, tok, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
for name, kw in [("bert-base", dict(num_hidden_layers=layers)), ("bert-small", dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024))]:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**kw), add_pooling_layer=False)
    model.save_pretrained(f"{work}/{name}", safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
        shutil.copy(f"{tok}/{f}", f"{work}/{name}/{f}")
EOF

  echo "== (b) kdmcse check: NCCL world of one, masks and encoder vs CPU"
  local check_rc=0
  WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
    timeout 120 "$bin/kdmcse" check --device "$device" --model "$work/bert-small" >"$out/check.jsonl" || check_rc=$?
  cat "$out/check.jsonl"

  echo "== (a, c) kdmcse and PyTorch training steps"
  KDMCSE_BIN_DIR="$bin" scripts/bench-vs-torch --model "$work/bert-base" --device "$device" \
    --precisions "fp32 tf32 bf16" --steps "$steps" --timeout "$limit" --data "$pack/data" --out "$work/bench" ||
    echo "bench-vs-torch failed: $?"
  cp "$work/bench/metrics-"*.jsonl "$work/bench/bench-vs-torch.json" "$out/" 2>/dev/null || true

  python3 - "$work" "$out" "$check_rc" <<'EOF'
import json, os, sys
work, out, check_rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
checks = [json.loads(l) for l in open(f"{out}/check.jsonl") if l.strip()]
summary = {
    "gpu": open(f"{work}/gpu.txt").read().strip(),
    "checks_passed": check_rc == 0 and bool(checks) and all(c["passed"] for c in checks),
    "checks": checks,
}
path = f"{out}/bench-vs-torch.json"
summary["training"] = json.load(open(path)) if os.path.exists(path) else {"error": "bench-vs-torch wrote nothing"}
json.dump(summary, open(f"{out}/device-check.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
}

case "$mode" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) sed -n '2,24p' "$0" >&2; exit 2 ;;
esac
