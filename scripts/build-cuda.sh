#!/usr/bin/env bash
# Builds kdmcse with the `cuda` feature (candle's CUDA kernels, NCCL collectives) on a machine
# without a GPU: NVIDIA's CUDA 13.0 compiler and headers come from PyPI into .cuda-venv/.
#   scripts/build-cuda.sh          # release binaries (target/release/kdmcse, kdmcse-launch)
#   scripts/build-cuda.sh check    # type-check only (no link: needs no CUDA libraries)
# The whole 13.0 series is pinned (nvvm and crt included): pip otherwise pulls newer ones whose
# PTX the 13.0 ptxas rejects; the H100 check machines run driver 580 (CUDA 13.0).
# Run time: the binaries load libcuda (the driver), libcudart, libcublas(Lt), libcurand, libnvrtc and
# libnccl through LD_LIBRARY_PATH (a PyTorch cu13 install carries them).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cuda-venv
if [ ! -x "$venv/bin/nvcc-ok" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
  touch "$venv/bin/nvcc-ok"
fi
cuda="$(cd "$venv"/lib/python3*/site-packages/nvidia/cu13 && pwd)"
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
if [ "${1:-build}" = check ]; then
  cargo check --release --workspace --features kdmcse/cuda
else
  cargo build --release --workspace --features kdmcse/cuda
fi
