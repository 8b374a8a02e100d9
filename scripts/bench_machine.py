#!/usr/bin/env python3
"""The machine a benchmark ran on, for scripts/bench-vs-torch: CPU model, vendor and the flags
that decide matmul speed (avx2, avx512f, amx), threads, the GPU and driver on a GPU run, and the
rate of PyTorch's own matmul there (2048^3; fp32 and bf16, and tf32 on a GPU) -- the ceiling
both training steps are measured against.

    python3 scripts/bench_machine.py [--device cpu|cuda] [--size 2048]

Prints one JSON object.
"""

import argparse
import json
import os
import platform
import subprocess
import time


def cpu_info():
    info = {"cpu_model": platform.processor() or platform.machine(), "cpu_flags": []}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    info.update(
        cpu_model=fields.get("model name", info["cpu_model"]),
        cpu_vendor=fields.get("vendor_id"),
        cpu_family=fields.get("cpu family"),
        cpu_model_number=fields.get("model"),
        cpu_flags=sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}),
    )
    return info


def matmul_tflops(torch, device, dtype, size, tf32=False):
    """TFLOP/s of a size^3 matmul; where that would take over a second per product (bf16 on a
    CPU without bf16 units), of the largest power-of-two size that does not."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    trial = 256
    while trial < size:
        x = torch.randn(trial, trial, device=device, dtype=dtype)
        x @ x  # warm
        start = time.perf_counter()
        x @ x
        if device == "cuda":
            torch.cuda.synchronize()
        if (time.perf_counter() - start) * (size / trial) ** 3 > 1.0:
            size = trial
            break
        trial *= 2
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < 1.0:
        a @ b
        runs += 1
    sync()
    seconds = (time.perf_counter() - start) / runs
    return {"tflops": 2 * size**3 / seconds / 1e12, "size": size}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=2048)
    args = p.parse_args()
    out = cpu_info()
    out["threads"] = int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)
    if args.device != "cpu":
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        out["gpu"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    try:
        import torch

        out["torch"] = torch.__version__
        if args.device == "cpu":
            torch.set_num_threads(out["threads"])
        out["torch_threads"] = torch.get_num_threads()
        device = "cuda" if args.device != "cpu" else "cpu"
        runs = {
            "fp32": matmul_tflops(torch, device, torch.float32, args.size),
            "bf16": matmul_tflops(torch, device, torch.bfloat16, args.size),
        }
        if device == "cuda":
            runs["tf32"] = matmul_tflops(torch, device, torch.float32, args.size, tf32=True)
        out["matmul_tflops"] = {k: v["tflops"] for k, v in runs.items()}
        out["matmul_size"] = {k: v["size"] for k, v in runs.items()}
    except Exception as e:  # the record is still useful without the rates
        out["matmul_error"] = repr(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
