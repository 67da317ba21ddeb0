# syntax=docker/dockerfile:1
#
# The recsys images: one target per binary, each a distroless-style image (no shell, no package
# manager) running as the non-root user 65532, happy with a read-only root filesystem.
#
#   docker build --target operator -t ghcr.io/recsys-io/recsys-operator:0.1.0 .
#   docker build --target scorer   -t ghcr.io/recsys-io/recsys-scorer:0.1.0 .
#   docker build --target trainer  -t ghcr.io/recsys-io/recsys-trainer:0.1.0 .
#
# (podman build and buildah bud take the same arguments.) The three targets share the build
# stage and the base layer, so building all three compiles once. The test environment builds
# the same layout without a container engine: tests/env/images.sh.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# What the base layer takes from the system besides the binaries' libraries (rootfs.sh).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin recsys-operator --bin recsys-scorer --bin recsys-trainer \
 && mkdir -p /out \
 && cp target/release/recsys-operator target/release/recsys-scorer target/release/recsys-trainer /out/ \
 && bash tests/env/images/rootfs.sh /rootfs /out/recsys-operator /out/recsys-scorer /out/recsys-trainer \
 && chown 65532:65532 /rootfs/home/nonroot

# Shared libraries, loader, CA bundle, passwd/group and /tmp: the layer every image starts from.
FROM scratch AS base
COPY --from=build /rootfs/ /
USER 65532:65532
WORKDIR /

FROM base AS operator
COPY --from=build /out/recsys-operator /usr/local/bin/recsys-operator
ENTRYPOINT ["/usr/local/bin/recsys-operator"]

FROM base AS scorer
COPY --from=build /out/recsys-scorer /usr/local/bin/recsys-scorer
ENTRYPOINT ["/usr/local/bin/recsys-scorer"]

FROM base AS trainer
COPY --from=build /out/recsys-trainer /usr/local/bin/recsys-trainer
ENTRYPOINT ["/usr/local/bin/recsys-trainer"]
