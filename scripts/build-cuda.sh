#!/usr/bin/env bash
# Builds kdmcse with the `cuda` feature (candle's CUDA kernels, NCCL collectives) on a machine
# without a GPU: NVIDIA's CUDA 13.0 compiler, headers and libraries come from PyPI into .cuda-venv/.
#   scripts/build-cuda.sh          # release binaries into target/cuda/release/{kdmcse,kdmcse-launch}
#   scripts/build-cuda.sh check    # type-check and lint (clippy -D warnings) every target with the
#                                  # feature: compiler and headers only, no libraries to link (CI)
#
# Pinning: the whole 13.0 series (nvvm and crt included), since pip otherwise pulls newer ones whose
# PTX the 13.0 ptxas rejects, and the H100 check machines run driver 580 (CUDA 13.0).
#
# Linking: candle links cudarc with `dynamic-linking`, so the binaries name libcuda.so.1 (the
# driver), libnccl.so.2, libnvrtc.so.13, libcurand.so.10, libcublas.so.13 and libcublasLt.so.13 as
# NEEDED. The wheels carry all but the driver; a stub libcuda.so (every cu* entry point of cudarc's
# bindings, soname libcuda.so.1) stands in for it at link time only, as the toolkit's own
# lib/stubs/libcuda.so does.
#
# Run time: the dynamic loader must find those libraries, e.g.
#   LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib:<site-packages>/nvidia/nccl/lib
# A PyTorch cu13 install carries the same sonames (scripts/device-check.sh finds them from python3);
# libcuda.so.1 comes from the machine's driver. The stub is never on a run-time path: it has no .so.1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-build-deps.sh
mode="${1:-build}"
venv=.cuda-venv
compiler=("nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
  "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*")
libraries=("nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*"
  "nvidia-nccl-cu13==2.28.*")

if [ ! -e "$venv/compiler-ok" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "${compiler[@]}"
  touch "$venv/compiler-ok"
fi
site="$(cd "$venv"/lib/python3*/site-packages && pwd)"
cuda="$site/nvidia/cu13"
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# Its own target directory, so that switching between this build and the CPU one rebuilds neither.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"

if [ "$mode" = check ]; then
  exec cargo clippy --release --workspace --all-targets --features kdmcse/cuda -- -D warnings
fi

if [ ! -e "$venv/libraries-ok" ]; then
  "$venv/bin/pip" install --quiet "${libraries[@]}"
  touch "$venv/libraries-ok"
fi

# Link-time names: unversioned symlinks beside the wheels' versioned libraries, and the driver stub,
# all in one folder handed to rustc (cudarc's own search also looks in $CUDA_ROOT/lib/stubs).
link="$site/nvidia/link"
mkdir -p "$link"
for lib in "$cuda"/lib/lib{cublas,cublasLt,curand,nvrtc,cudart}.so.* "$site"/nvidia/nccl/lib/libnccl.so.*; do
  [ -e "$lib" ] || { echo "build-cuda: missing $lib (pip install of ${libraries[*]} incomplete?)" >&2; exit 1; }
  base="$(basename "$lib")"
  ln -sf "$lib" "$link/${base%%.so.*}.so"
done
if [ ! -e "$link/libcuda.so" ]; then
  cudarc="$(cargo metadata --format-version 1 --features kdmcse/cuda 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')"
  bindings="$(dirname "$cudarc")/src/driver/sys/mod.rs"
  grep -oE '^\s+(pub )?fn cu[A-Za-z0-9_]+\(' "$bindings" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u |
    sed 's/.*/void &(void) {}/' >"$link/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda-stub.c"
fi

RUSTFLAGS="${RUSTFLAGS:-} -L native=$link" cargo build --release --workspace --features kdmcse/cuda
ls -l "$CARGO_TARGET_DIR"/release/kdmcse "$CARGO_TARGET_DIR"/release/kdmcse-launch
