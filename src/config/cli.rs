//! The flags and environment layer: clap types. Every setting is a flag and an environment variable;
//! the config file may set the same ones under the variable's name in lower case (see
//! [`Settings::file_slot`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "jobqueue", version, about = "A durable job queue service on PostgreSQL")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Apply migrations, then run the HTTP API and the workers (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate {
        /// Record every migration as applied without running it, for a schema a DBA applied by hand
        /// with psql.
        #[arg(long)]
        baseline: bool,
    },
    /// Measure throughput and enqueue-to-start latency on a scratch database.
    Bench(BenchArgs),
    /// GET /healthz of the instance on this machine (PORT); exit 0 when healthy, 1 otherwise. For
    /// container health checks, so that the image needs no curl.
    Healthcheck {
        /// Give up after this long.
        #[arg(long, default_value = "3s")]
        timeout: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// No-op jobs to drain in the throughput phase.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: u32,
    /// Jobs per second enqueued in the latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Length of the latency phase, e.g. 5s.
    #[arg(long, default_value = "5s")]
    pub latency_for: String,
    /// Concurrent jobs of the benchmark queue (default: WORKERS, as `jobqueue serve` would run).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// How long each job's handler waits before it succeeds, e.g. 50ms (an I/O-bound job); 0 is a
    /// no-op.
    #[arg(long, default_value = "0s")]
    pub job_sleep: String,
    /// Database the benchmark creates and drops (it must not be the service's database).
    #[arg(long, default_value = "jobqueue_bench")]
    pub database: String,
}

/// The raw settings as given. Values stay strings here so that a bad one produces an error naming the
/// environment variable, not clap's flag syntax.
#[derive(Debug, Clone, Default, Args)]
pub struct Settings {
    /// TOML file with settings and per-queue handlers; flags and environment variables override its
    /// top-level settings.
    #[arg(long, env = "JOBQUEUE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// PostgreSQL connection URL; the database is created if it does not exist.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// HTTP port.
    #[arg(long, env = "PORT", global = true)]
    pub port: Option<String>,
    /// HTTP bind address.
    #[arg(long, env = "BIND", global = true)]
    pub bind: Option<String>,
    /// Concurrency of the default queue (shorthand for QUEUES=default:N).
    #[arg(long, env = "WORKERS", global = true)]
    pub workers: Option<String>,
    /// Queues served by this instance: name:concurrency[:key=value...], comma separated.
    #[arg(long, env = "QUEUES", global = true)]
    pub queues: Option<String>,
    /// term or json.
    #[arg(long, env = "LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// error, warn, info, debug or trace.
    #[arg(long, env = "LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", global = true)]
    pub max_body_bytes: Option<String>,
    /// Poll fallback when no notification arrives, e.g. 1s.
    #[arg(long, env = "POLL_INTERVAL", global = true)]
    pub poll_interval: Option<String>,
    /// Lease a worker holds on a claimed job, extended while it runs.
    #[arg(long, env = "JOB_LEASE", global = true)]
    pub job_lease: Option<String>,
    /// Longest a handler may run before the attempt counts as failed.
    #[arg(long, env = "JOB_TIMEOUT", global = true)]
    pub job_timeout: Option<String>,
    /// How long shutdown waits for running jobs before releasing them.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", global = true)]
    pub shutdown_timeout: Option<String>,
    /// Size of the connection pool used by the API and maintenance.
    #[arg(long, env = "DB_POOL_SIZE", global = true)]
    pub db_pool_size: Option<String>,
    /// Deadline of one database statement (statement_timeout), e.g. 10s.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", global = true)]
    pub db_statement_timeout: Option<String>,
    /// Longest wait for a pooled database connection before a request gets a 503.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT", global = true)]
    pub db_acquire_timeout: Option<String>,
    /// Most HTTP connections open at once.
    #[arg(long, env = "MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<String>,
    /// Time a client has to send a request's headers (and most an idle keep-alive connection is kept).
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", global = true)]
    pub http_header_timeout: Option<String>,
    /// Time a client has to send a request's body.
    #[arg(long, env = "HTTP_BODY_TIMEOUT", global = true)]
    pub http_body_timeout: Option<String>,
    /// API bearer tokens: scope:token,scope:token (scopes read, write, worker, admin).
    #[arg(long, env = "API_TOKENS", global = true, hide_env_values = true)]
    pub api_tokens: Option<String>,
    /// Origins allowed to call the API from a browser (CORS), comma separated.
    #[arg(long, env = "CORS_ORIGINS", global = true)]
    pub cors_origins: Option<String>,
    /// Most requests waiting at once with ?wait= (or long-polling).
    #[arg(long, env = "MAX_WAITERS", global = true)]
    pub max_waiters: Option<String>,
    /// Default attempts per job when neither the job nor its queue says.
    #[arg(long, env = "MAX_ATTEMPTS", global = true)]
    pub max_attempts: Option<String>,
    /// Retry backoff after the first failure; doubles per attempt.
    #[arg(long, env = "RETRY_BACKOFF", global = true)]
    pub retry_backoff: Option<String>,
    /// Upper bound of the retry backoff.
    #[arg(long, env = "RETRY_BACKOFF_MAX", global = true)]
    pub retry_backoff_max: Option<String>,
    /// Random spread of each backoff, a fraction between 0 and 1.
    #[arg(long, env = "RETRY_JITTER", global = true)]
    pub retry_jitter: Option<String>,
    /// Keep done jobs this long (0 keeps them forever).
    #[arg(long, env = "RETENTION_DONE", global = true)]
    pub retention_done: Option<String>,
    /// Keep failed jobs this long (0 keeps them forever).
    #[arg(long, env = "RETENTION_FAILED", global = true)]
    pub retention_failed: Option<String>,
    /// Keep cancelled jobs this long (0 keeps them forever).
    #[arg(long, env = "RETENTION_CANCELLED", global = true)]
    pub retention_cancelled: Option<String>,
    /// How often the maintenance task looks for expired leases and old jobs.
    #[arg(long, env = "MAINTENANCE_INTERVAL", global = true)]
    pub maintenance_interval: Option<String>,
    /// Name of this instance in locked_by; defaults to a generated one.
    #[arg(long, env = "INSTANCE_ID", global = true)]
    pub instance_id: Option<String>,
    /// Serve /metrics on this address (e.g. 0.0.0.0:9090) as well; by default only on the API port.
    #[arg(long, env = "METRICS_BIND", global = true)]
    pub metrics_bind: Option<String>,
    /// Threads that run the API and the workers; by default half the cores, at least one.
    #[arg(long, env = "RUNTIME_THREADS", global = true)]
    pub runtime_threads: Option<String>,
}

impl Settings {
    /// The top-level keys a config file may set: the environment variables' names in lower case.
    /// `QUEUES` is absent: the file declares queues as `[queues.NAME]` tables.
    pub const FILE_KEYS: &'static [&'static str] = &[
        "database_url",
        "port",
        "bind",
        "workers",
        "log_format",
        "log_level",
        "max_body_bytes",
        "poll_interval",
        "job_lease",
        "job_timeout",
        "shutdown_timeout",
        "db_pool_size",
        "db_statement_timeout",
        "db_acquire_timeout",
        "max_connections",
        "http_header_timeout",
        "http_body_timeout",
        "max_waiters",
        "cors_origins",
        "max_attempts",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "retention_done",
        "retention_failed",
        "retention_cancelled",
        "maintenance_interval",
        "instance_id",
        "metrics_bind",
        "runtime_threads",
    ];

    /// The field a config file's top-level `key` sets, if it is one of [`Settings::FILE_KEYS`].
    pub fn file_slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        Some(match key {
            "database_url" => &mut self.database_url,
            "port" => &mut self.port,
            "bind" => &mut self.bind,
            "workers" => &mut self.workers,
            "log_format" => &mut self.log_format,
            "log_level" => &mut self.log_level,
            "max_body_bytes" => &mut self.max_body_bytes,
            "poll_interval" => &mut self.poll_interval,
            "job_lease" => &mut self.job_lease,
            "job_timeout" => &mut self.job_timeout,
            "shutdown_timeout" => &mut self.shutdown_timeout,
            "db_pool_size" => &mut self.db_pool_size,
            "db_statement_timeout" => &mut self.db_statement_timeout,
            "db_acquire_timeout" => &mut self.db_acquire_timeout,
            "max_connections" => &mut self.max_connections,
            "http_header_timeout" => &mut self.http_header_timeout,
            "http_body_timeout" => &mut self.http_body_timeout,
            "max_waiters" => &mut self.max_waiters,
            "cors_origins" => &mut self.cors_origins,
            "max_attempts" => &mut self.max_attempts,
            "retry_backoff" => &mut self.retry_backoff,
            "retry_backoff_max" => &mut self.retry_backoff_max,
            "retry_jitter" => &mut self.retry_jitter,
            "retention_done" => &mut self.retention_done,
            "retention_failed" => &mut self.retention_failed,
            "retention_cancelled" => &mut self.retention_cancelled,
            "maintenance_interval" => &mut self.maintenance_interval,
            "instance_id" => &mut self.instance_id,
            "metrics_bind" => &mut self.metrics_bind,
            "runtime_threads" => &mut self.runtime_threads,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_key_has_a_slot() {
        let mut s = Settings::default();
        for key in Settings::FILE_KEYS {
            assert!(s.file_slot(key).is_some(), "{key}");
        }
        assert!(s.file_slot("queues").is_none());
        assert!(s.file_slot("config").is_none());
    }
}
