# hookgate: a static-enough release binary on distroless, running as non-root.
# Build: docker build -t hookgate:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked && strip target/release/hookgate

# glibc and CA certificates, nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/hookgate /usr/local/bin/hookgate
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/hookgate"]
CMD ["serve", "--config", "/etc/hookgate/config/hookgate.toml"]
