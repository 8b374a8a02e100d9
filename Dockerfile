# The training image: kdmcse and kdmcse-launch built with the `cuda` feature on a CUDA base.
#   docker build -t ghcr.io/<you>/kdmcse:0.1.0 --build-arg CUDA_COMPUTE_CAP=90 .
# (Needs a Docker engine; none runs on the development machines.)
# CUDA 13.0, as scripts/build-cuda.sh pins (driver 580 or newer on the nodes).
ARG CUDA_VERSION=13.0.1

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG CUDA_COMPUTE_CAP=90
# libnccl-dev: candle links NCCL (and the other CUDA libraries) dynamically; the devel image's
# lib64/stubs/libcuda.so stands in for the driver at link time.
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config libnccl-dev \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --features kdmcse/cuda \
    && cp target/release/kdmcse target/release/kdmcse-launch /usr/local/bin/

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
# cuBLAS, cuRAND, NVRTC and NCCL come with the runtime image's CUDA libraries; libcuda from the
# host driver through the NVIDIA container runtime.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libnccl2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/kdmcse /usr/local/bin/kdmcse-launch /usr/local/bin/
ENTRYPOINT ["kdmcse-launch"]
