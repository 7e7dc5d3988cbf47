# The torus image: torusd, torusctl, torusblk (the FlexVolume driver) and the
# entrypoint that maps the environment to torusd flags (see deploy/ and the
# README's "Kubernetes" section).
#
#   docker build -t torus:0.1.0 .
#
# Stage 1 builds everything; the driver is linked statically (musl) because
# DROP_MOUNT_BIN copies it to the host, where kubelet runs it with whatever C
# library the host has.
FROM rust:1.89-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p torus -p torusblk --bins \
 && cargo build --release --locked -p torusblk --bin torusblk --target x86_64-unknown-linux-musl

# Stage 2: the runtime. kmod provides modprobe for the init container that
# loads the nbd module on the host.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/torusd /usr/local/bin/torusd
COPY --from=build /src/target/release/torusctl /usr/local/bin/torusctl
COPY --from=build /src/target/release/torus-entrypoint /usr/local/bin/torus-entrypoint
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/torusblk /usr/local/bin/torusblk
VOLUME ["/data"]
EXPOSE 4321 10809 40000
ENTRYPOINT ["/usr/local/bin/torus-entrypoint"]
