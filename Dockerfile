# The relay's image: built in one stage, run from a small one as a non-root user.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY relay ./relay
COPY sql ./sql
COPY triggers ./triggers
COPY tests ./tests
RUN cargo build --release --locked -p relay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home relay
COPY --from=build /src/target/release/relay /usr/local/bin/relay
# The SQL the binary embeds, for DBAs who apply it by hand.
COPY sql /usr/share/relay/sql
COPY triggers /usr/share/relay/triggers
USER relay
ENV RELAY_BIND=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["relay"]
CMD ["serve"]
