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
#       the median forward / backward / update split (train.phase_timings);
#   (b) `kdmcse check` as a launched world of one on the GPU: NCCL communicator made through the
#       rendezvous store, every collective checked, dropout masks and a small random encoder's
#       forward and gradients against the CPU (fp32, bf16);
#   (c) the same step in PyTorch (scripts/torch_reference_step.py) for the side-by-side ratio;
# and writes one JSON summary with the ratios and the model FLOP utilisation.
# The binaries find cuBLAS, cuRAND, NVRTC, NCCL and the CUDA runtime in the machine's PyTorch
# install (its nvidia-* cu13 wheels) through LD_LIBRARY_PATH, and libcuda.so.1 from the driver.
# A dry run of `run` on a CPU machine (to test this script): KDMCSE_CHECK_DEVICE=cpu,
# KDMCSE_CHECK_BIN=target/release, KDMCSE_CHECK_STEPS=7 (PyTorch and transformers installed).
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
  local device="${KDMCSE_CHECK_DEVICE:-cuda}" steps="${KDMCSE_CHECK_STEPS:-30}" bin="$work/bin"
  mkdir -p "$bin"
  if [ -n "${KDMCSE_CHECK_BIN:-}" ]; then
    cp "$KDMCSE_CHECK_BIN"/kdmcse "$KDMCSE_CHECK_BIN"/kdmcse-launch "$bin/"
  else
    for b in kdmcse kdmcse-launch; do gunzip -c "$pack/bin/$b.gz" >"$bin/$b" && chmod +x "$bin/$b"; done
  fi
  export KDMCSE_BIN="$bin/kdmcse" RUST_LOG="${RUST_LOG:-info}"

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
  python3 - "$work" "$pack/tokenizer" <<'EOF'
import shutil, sys, torch, transformers
work, tok = sys.argv[1], sys.argv[2]
for name, kw in [("bert-base", {}), ("bert-small", dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024))]:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**kw), add_pooling_layer=False)
    model.save_pretrained(f"{work}/{name}", safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
        shutil.copy(f"{tok}/{f}", f"{work}/{name}/{f}")
EOF

  echo "== (b) kdmcse check: NCCL world of one, masks and encoder vs CPU"
  local check_rc=0
  WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
    timeout 240 "$bin/kdmcse" check --device "$device" --model "$work/bert-small" >"$out/check.jsonl" || check_rc=$?
  cat "$out/check.jsonl"

  local data
  data="$(cd "$pack/data" && pwd)"
  cat >"$work/train.toml" <<EOF
[model]
path = "$work/bert-base"
pooling = "cls"
max_len = 32
[data]
text = ["$data/wiki.txt"]
eval = "$data"
[loss]
objective = "simcse"
margin_text = 0.0
temp = 0.05
[train]
batch_size = 64
max_steps = $steps
eval_steps = 0
lr = 3e-5
device = "$device"
phase_timings = true
[output]
dir = "$work/runs"
checkpoint_steps = 0
EOF
  # Peak memory of a command: nvidia-smi's used memory, sampled every 50 ms, minus the idle level.
  peak_mib() {
    local log="$work/mem-$1.txt"; shift
    if [ "$device" = cpu ]; then "$@"; return; fi
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$log" &
    local sampler=$!
    local rc=0
    "$@" || rc=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    return $rc
  }
  for precision in fp32 tf32 bf16; do
    local setting="train.precision=fp32"
    [ "$precision" = bf16 ] && setting="train.precision=bf16"
    local tf32=false
    [ "$precision" = tf32 ] && tf32=true
    echo "== (a) kdmcse $precision"
    local workers=(--gpus 1)
    [ "$device" = cpu ] && workers=(--nproc 1)
    peak_mib "kdmcse-$precision" timeout 240 "$bin/kdmcse-launch" "${workers[@]}" -- --config "$work/train.toml" \
      --set "$setting" --set "train.tf32=$tf32" --set "output.dir=$work/runs/$precision" \
      --set "output.metrics=$out/metrics-$precision.jsonl" --resume none || echo "kdmcse $precision failed: $?"
    echo "== (c) torch $precision"
    peak_mib "torch-$precision" timeout 240 python3 scripts/torch_reference_step.py --model "$work/bert-base" \
      --text "$data/wiki.txt" --precision "$precision" --steps "$steps" --device "$device" \
      >"$work/torch-$precision.json" ||
      echo "torch $precision failed: $?"
    cat "$work/torch-$precision.json" || true
  done

  python3 - "$work" "$out" "$check_rc" <<'EOF'
import glob, json, os, statistics, sys
work, out, check_rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
gpu = open(f"{work}/gpu.txt").read().strip()
def peak(tag):
    path = f"{work}/mem-{tag}.txt"
    vals = [int(v) for v in open(path).read().split() if v.strip().isdigit()] if os.path.exists(path) else []
    return (max(vals) - min(vals)) if vals else None
# Model FLOPs of one step (the reference's full 12-layer forward, x3 for backward), per token:
# 24 h^2 per layer for the matmuls, 4 L h for attention scores and context.
h, layers, batch = 768, 12, 64
peaks = {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12} if "H100" in gpu else {}
summary = {"gpu": gpu, "checks_passed": check_rc == 0, "checks": [], "runs": {}}
for line in open(f"{out}/check.jsonl"):
    if line.strip():
        summary["checks"].append(json.loads(line))
summary["checks_passed"] &= bool(summary["checks"]) and all(c["passed"] for c in summary["checks"])
for precision in ["fp32", "tf32", "bf16"]:
    run = {}
    try:
        torch_run = json.load(open(f"{work}/torch-{precision}.json"))
        torch_run["peak_mib_nvidia_smi"] = peak(f"torch-{precision}")
        run["torch"] = torch_run
    except Exception as e:
        run["torch"] = {"error": repr(e)}
    try:
        steps = [json.loads(l) for l in open(f"{out}/metrics-{precision}.jsonl") if '"step_s"' in l]
        timed = [s["step_s"] for s in steps[5:]]
        ours = {"timed_steps": len(timed), "median_step_s": statistics.median(timed),
                "mean_step_s": statistics.mean(timed), "last_loss": steps[-1]["loss"]}
        ours["sentences_per_s"] = batch / ours["median_step_s"]
        phases = [s["phases"] for s in steps[5:] if "phases" in s]
        if phases:
            ours["median_phases_s"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
        ours["peak_mib_nvidia_smi"] = peak(f"kdmcse-{precision}")
        run["kdmcse"] = ours
    except Exception as e:
        run["kdmcse"] = {"error": repr(e)}
    length = run["torch"].get("mean_padded_len", 32)
    flops = 3 * 2 * batch * length * layers * (24 * h * h + 4 * length * h)
    run["model_tflop_per_step"] = flops / 1e12
    for side in ("kdmcse", "torch"):
        s = run[side].get("median_step_s")
        if s:
            run[side]["model_tflops"] = flops / s / 1e12
            if precision in peaks:
                run[side]["mfu"] = flops / s / peaks[precision]
    if "median_step_s" in run["kdmcse"] and "median_step_s" in run["torch"]:
        # > 1: kdmcse trains faster than PyTorch on this card.
        run["throughput_vs_torch"] = run["torch"]["median_step_s"] / run["kdmcse"]["median_step_s"]
    summary["runs"][precision] = run
json.dump(summary, open(f"{out}/device-check.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
}

case "$mode" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) sed -n '2,21p' "$0" >&2; exit 2 ;;
esac
