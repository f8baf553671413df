# syntax=docker/dockerfile:1
# One image with every ledger binary (gateway, command-api, projector, fraud-worker, ledger);
# each compose service picks its binary with `command`. Build: `docker build -t ledger:local .`
#
# RUST_VERSION: at least the workspace's rust-version (1.90); the lock file is built and tested
# with 1.95. The builder and the runtime use the same Debian suite, so the glibc the binaries
# link against is the one they run with.
ARG RUST_VERSION=1.95
ARG DEBIAN_SUITE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_SUITE} AS builder
WORKDIR /src
# Optional cargo features, e.g. the KurrentDB event log (compose.yml's `kurrentdb` profile):
# "command-api/kurrentdb projector/kurrentdb ledger/kurrentdb". Empty: the default build.
ARG CARGO_FEATURES=""
COPY . .
# The registry and target caches survive between builds (BuildKit); the binaries are copied out
# of the cached target directory, since a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bins ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
    && mkdir -p /out \
    && cp target/release/gateway target/release/command-api target/release/projector \
          target/release/fraud-worker target/release/ledger /out/

FROM debian:${DEBIAN_SUITE}-slim AS runtime
# ca-certificates for TLS to managed PostgreSQL/RabbitMQ/Redis; curl for the health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ledger
COPY --from=builder /out/ /usr/local/bin/
USER ledger
ENV LOG_FORMAT=json
# No default service: compose (or `docker run ledger:local <binary>`) names the binary.
CMD ["ledger", "--help"]
