# syntax=docker/dockerfile:1

# ---- build ------------------------------------------------------------------------------------------
# The crate declares rust-version 1.92; rust:1 tracks the latest stable release.
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, against placeholder sources, so that this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# db/ is needed at compile time: the migrations are embedded in the binary
# (refinery's embed_migrations!("db/migrations")), not read at run time.
COPY src ./src
COPY db ./db
# COPY keeps the files' original mtimes, which may be older than the placeholder build;
# touch them so cargo sees the crate as changed and rebuilds it.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/jobqueue /usr/local/bin/jobqueue

# ---- run --------------------------------------------------------------------------------------------
FROM debian:bookworm-slim

# curl is for the HEALTHCHECK below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 jobqueue \
    && useradd --system --uid 10001 --gid jobqueue --no-create-home --shell /usr/sbin/nologin jobqueue

COPY --from=builder /usr/local/bin/jobqueue /usr/local/bin/jobqueue

# BIND defaults to 0.0.0.0 already; it is spelled out because a container must not listen on
# loopback only. JSON logs go to stderr, one object per line.
ENV BIND=0.0.0.0 \
    PORT=8080 \
    LOG_FORMAT=json

EXPOSE 8080

# /healthz answers without touching the database (liveness); /readyz also checks the database.
# The start period covers database creation and migrations, which run before the port is bound.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1

USER jobqueue

# Exec form: jobqueue is PID 1 and receives SIGTERM itself, which starts the graceful shutdown
# (stop claiming, wait up to SHUTDOWN_TIMEOUT, release the rest back to pending).
ENTRYPOINT ["jobqueue"]
CMD ["serve"]
