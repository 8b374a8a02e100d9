# The training image: kdmcse and kdmcse-launch built with the `cuda` feature on a CUDA base,
# running as an unprivileged user (uid 1000).
#   docker build -t ghcr.io/<you>/kdmcse:0.1.0 --build-arg CUDA_COMPUTE_CAP=90 \
#       --build-arg GIT_REVISION=$(git rev-parse --short=12 HEAD) .
# (Needs a Docker engine; none runs on the development machines.)
# CUDA 13.0, as scripts/build-cuda.sh pins (driver 580 or newer on the nodes).
ARG CUDA_VERSION=13.0.1

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG CUDA_COMPUTE_CAP=90
# libnccl-dev: candle links NCCL (and the other CUDA libraries) dynamically; the devel image's
# lib64/stubs/libcuda.so stands in for the driver at link time.
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config libnccl-dev protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
# The dependencies first, on stub sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY launcher/Cargo.toml launcher/
RUN mkdir -p src launcher/src benches \
    && echo 'fn main() {}' > build.rs && touch src/lib.rs \
    && for f in src/main.rs launcher/src/main.rs benches/encoder.rs benches/checkpoint.rs benches/objective.rs; do echo 'fn main() {}' > "$f"; done \
    && cargo build --release --workspace --features kdmcse/cuda \
    && rm -rf build.rs src launcher/src benches
COPY . .
# The revision --version reports (the context has no .git).
ARG GIT_REVISION=unknown
ENV KDMCSE_GIT_REVISION=${GIT_REVISION}
# touch: the copied sources may be older than the stubs' build, which cargo would then keep.
RUN touch build.rs src/lib.rs src/main.rs launcher/src/main.rs \
    && cargo build --release --workspace --features kdmcse/cuda \
    && cp target/release/kdmcse target/release/kdmcse-launch /usr/local/bin/

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
# cuBLAS, cuRAND, NVRTC and NCCL come with the runtime image's CUDA libraries; libcuda from the
# host driver through the NVIDIA container runtime.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libnccl2 \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 kdmcse
COPY --from=build /usr/local/bin/kdmcse /usr/local/bin/kdmcse-launch /usr/local/bin/
USER 1000
WORKDIR /home/kdmcse
ENTRYPOINT ["kdmcse-launch"]
