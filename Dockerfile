# The relay's image, in two stages: the build stage compiles the workspace's `relay` binary; the
# runtime stage is Debian slim with that binary, the SQL it embeds, and nothing else but curl (for
# the health check) and CA certificates. It runs as an unprivileged user.
FROM rust:1.89-bookworm AS build
WORKDIR /src
# Every workspace member's manifest and sources, the files the binary embeds (SQL, the inspector
# page), and the tests the relay's manifest names.
COPY Cargo.toml Cargo.lock ./
COPY relay ./relay
COPY bench ./bench
COPY sql ./sql
COPY triggers ./triggers
COPY inspector ./inspector
COPY tests ./tests
RUN cargo build --release --locked -p relay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /src/target/release/relay /usr/local/bin/relay
# The SQL the binary embeds, for DBAs who apply it by hand (`relay migrate` needs no files).
COPY sql /usr/share/relay/sql
COPY triggers /usr/share/relay/triggers
USER 10001
ENV RELAY_BIND=0.0.0.0:8080
# /metrics on a port of its own, for the monitoring network: publishing 8080 does not publish it.
# Not in EXPOSE, so `docker run -P` leaves it unpublished too.
ENV RELAY_METRICS_BIND=0.0.0.0:9090
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/api/realtime/health || exit 1
ENTRYPOINT ["relay"]
CMD ["serve"]
