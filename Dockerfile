# syntax=docker/dockerfile:1

# ---- build ------------------------------------------------------------------------------------------
# Pinned, so that an image built next month is built by the same compiler; at least the crate's
# rust-version (1.92).
FROM rust:1.92-bookworm AS builder
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
# (refinery's embed_migrations!("db/migrations")), not read at run time; build.rs tells cargo so.
COPY build.rs ./
COPY src ./src
COPY db ./db
# COPY keeps the files' original mtimes, which may be older than the placeholder build;
# touch them so cargo sees the crate as changed and rebuilds it.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && strip --strip-debug -o /usr/local/bin/jobqueue target/release/jobqueue
# --strip-debug: the release profile's line tables are 55 of the binary's 70 MB; symbols stay, so a
# panic's backtrace still names functions.

# ---- run --------------------------------------------------------------------------------------------
# distroless cc: glibc, libgcc and CA certificates (for TLS to PostgreSQL), no shell and no package
# manager. The health check is the binary itself.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /usr/local/bin/jobqueue /usr/local/bin/jobqueue

# BIND defaults to 0.0.0.0 already; it is spelled out because a container must not listen on
# loopback only. JSON logs go to stderr, one object per line.
ENV BIND=0.0.0.0 \
    PORT=8080 \
    LOG_FORMAT=json

EXPOSE 8080

# /healthz answers without touching the database (liveness); /readyz also checks the database.
# The start period covers database creation and migrations, which run before the port is bound.
# `jobqueue healthcheck` reads PORT and BIND from the same environment as the server.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/jobqueue", "healthcheck", "--timeout", "2s"]

USER nonroot

# Exec form: jobqueue is PID 1 and receives SIGTERM itself, which starts the graceful shutdown
# (stop claiming, wait up to SHUTDOWN_TIMEOUT, release the rest back to pending).
ENTRYPOINT ["jobqueue"]
CMD ["serve"]
