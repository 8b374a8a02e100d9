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
# Knobs: KDMCSE_CHECK_STEPS (50; the first fifth are warm-up, left out of the timings),
# KDMCSE_CHECK_TIMEOUT (seconds per training run, 75) and KDMCSE_CHECK_BUDGET (seconds for the
# whole run, 540: the GPU machine's command limit is 600). Every part runs under `timeout -k`;
# a precision that cannot finish before the budget is skipped; device-check.json is written on
# exit whatever finished, and names what failed or was skipped. A dry run of `run` on a CPU
# machine, to test this script: KDMCSE_CHECK_DEVICE=cpu KDMCSE_CHECK_BIN=target/release
# KDMCSE_CHECK_STEPS=7 KDMCSE_CHECK_TIMEOUT=900 KDMCSE_CHECK_LAYERS=2 (a 2-layer "BERT-base"),
# with PyTorch and transformers installed; KDMCSE_CHECK_PLANT=hang or =fail plants a check that
# never returns or one that fails, to see the summary still arrive.
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
  deadline=$(( $(date +%s) + ${KDMCSE_CHECK_BUDGET:-540} ))
  check_rc=unset summary_work="$work" summary_out="$out"
  trap summarize EXIT
  mkdir -p "$bin"
  if [ -n "${KDMCSE_CHECK_BIN:-}" ]; then
    cp "$KDMCSE_CHECK_BIN"/kdmcse "$KDMCSE_CHECK_BIN"/kdmcse-launch "$bin/"
  else
    for b in kdmcse kdmcse-launch; do gunzip -c "$pack/bin/$b.gz" >"$bin/$b" && chmod +x "$bin/$b"; done
  fi
  export RUST_LOG="${RUST_LOG:-info}"
  # NCCL's warnings (and only those) on stderr; the driver's JIT cache kept for the whole run.
  export NCCL_DEBUG=WARN NCCL_DEBUG_FILE=/dev/stderr
  export CUDA_CACHE_PATH="$work/cuda-cache" CUDA_CACHE_MAXSIZE=4294967296

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

  echo "== (b) kdmcse check: NCCL world of one, kernels, masks and encoder vs CPU"
  # Each result is printed (and kept) as it is produced, so a hang still leaves the rest.
  local check=("$bin/kdmcse" check --device "$device" --model "$work/bert-small")
  case "${KDMCSE_CHECK_PLANT:-}" in
    hang) check=(sleep 100000) ;;
    fail) check=(sh -c 'echo "{\"name\": \"planted\", \"passed\": false, \"detail\": \"planted failure\"}"; exit 1') ;;
  esac
  check_rc=0
  set +e
  WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
    timeout -k 5 120 "${check[@]}" | tee "$out/check.jsonl"
  check_rc=${PIPESTATUS[0]}
  set -e


  echo "== (a, c) kdmcse and PyTorch training steps"
  KDMCSE_BIN_DIR="$bin" timeout -k 10 $(( deadline - $(date +%s) )) scripts/bench-vs-torch --model "$work/bert-base" \
    --device "$device" --precisions "fp32 tf32 bf16" --steps "$steps" --timeout "$limit" --deadline "$deadline" \
    --data "$pack/data" --out "$work/bench" || echo "bench-vs-torch failed: $?"
}

# device-check.json from whatever finished (an EXIT trap: also after a failure or a kill by
# timeout); only JSON lines of the check's output count as results.
summarize() {
  trap - EXIT
  cp "$summary_work/bench/metrics-"*.jsonl "$summary_work/bench/bench-vs-torch.json" "$summary_work/bench/machine.json" \
    "$summary_out/" 2>/dev/null || true
  python3 - "$summary_work" "$summary_out" "$check_rc" <<'EOF'
import json, os, sys
work, out, check_rc = sys.argv[1], sys.argv[2], sys.argv[3]
checks, stray = [], 0
if os.path.exists(f"{out}/check.jsonl"):
    for line in open(f"{out}/check.jsonl"):
        line = line.strip()
        try:
            record = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "name" in record:
            checks.append(record)
        elif line:
            stray += 1
failed = [c["name"] for c in checks if not c.get("passed")]
if check_rc == "unset":
    failed.append("check: never ran")
elif check_rc != "0":
    failed.append(f"check: exit {check_rc}" + (" (timed out)" if check_rc in ("124", "137") else ""))
gpu = open(f"{work}/gpu.txt").read().strip() if os.path.exists(f"{work}/gpu.txt") else "unknown"
summary = {"gpu": gpu, "checks_passed": not failed and bool(checks), "failed": failed, "checks": checks,
           "stray_output_lines": stray}
path = f"{out}/bench-vs-torch.json"
training = json.load(open(path)) if os.path.exists(path) else {"error": "bench-vs-torch wrote nothing"}
summary["training"] = training
summary["skipped_precisions"] = training.get("skipped", []) if isinstance(training, dict) else []
json.dump(summary, open(f"{out}/device-check.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
}

case "$mode" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) sed -n '2,27p' "$0" >&2; exit 2 ;;
esac
