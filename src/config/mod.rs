//! Configuration, in three layers:
//!
//! - [`cli`]: command-line flags and environment variables (clap types). Values stay strings there, so
//!   that a bad one produces an error naming the variable, not clap's flag syntax.
//! - [`file`](mod@file): the optional TOML file (`--config PATH` / `JOBQUEUE_CONFIG`): the same top-level settings
//!   under their variables' names in lower case, and a `[queues.NAME]` table per queue with its
//!   handler.
//! - `resolve`: merges them (flags, then environment, then `.env`, then the file, then defaults) and
//!   parses every value once into the typed [`Config`] below.
//!
//! A bad value is a [`ConfigError`] naming the variable, or the file, queue and key; `main` prints it
//! and exits with code 2. The ranges checked live in [`crate::limits`].

pub mod cli;
pub mod file;
mod resolve;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::job::RetryPolicy;

pub use cli::{BenchArgs, Cli, Command, Settings};
pub use resolve::{parse_duration, parse_queues};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/jobqueue";
pub const DEFAULT_QUEUE: &str = "default";

/// A configuration value that cannot be used. Its `Display` is what is printed before exit code 2.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A flag or environment variable.
    #[error("invalid {name}={value:?}: expected {expected}")]
    Value { name: &'static str, value: String, expected: String },
    /// The config file: unreadable, not TOML, or a key that is unknown or has a bad value. The message
    /// names the queue and key.
    #[error("config file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Term,
    Json,
}

/// One queue served by this instance. Build it with [`QueueConfig::new`] and functional update
/// syntax (`QueueConfig { retry, ..QueueConfig::new("email", 4) }`), so that new settings do not
/// break your code.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Longest one attempt may run; `None` means the instance's `JOB_TIMEOUT`.
    pub timeout: Option<Duration>,
}

impl QueueConfig {
    /// A queue with `concurrency` slots, the default retry policy and the instance's job timeout.
    pub fn new(name: impl Into<String>, concurrency: usize) -> QueueConfig {
        QueueConfig { name: name.into(), concurrency, retry: RetryPolicy::default(), timeout: None }
    }
}

/// Slots of a queue that sets none. Handlers are async: a slot is a task, not a thread, so a hundred
/// cost little while they wait on I/O (a handler that sleeps 50 ms still runs 2,000 jobs a second),
/// and with quick handlers up to 400 jobs are claimed ahead, so claims are batches of up to 500
/// (`worker::prefetch`; docs/performance.md has the drain rate by concurrency). Webhook and command
/// queues usually want fewer: set `concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 100;

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig::new(DEFAULT_QUEUE, DEFAULT_CONCURRENCY)
    }
}

/// What `jobqueue serve` runs for a queue's jobs, as declared in the config file. Library users
/// register [`crate::Handler`]s of their own instead.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerSpec {
    /// The original service's behaviour: done, with "Job processed successfully".
    Builtin,
    /// POST the job to `url`, signed with `secret`.
    Webhook { url: String, secret: Secret },
    /// Run `argv` (no shell) with the payload on stdin.
    Command { argv: Vec<String> },
    /// Answer with the job, attempt and holder; panic on the attempts the payload asks for.
    Drill,
}

impl HandlerSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            HandlerSpec::Builtin => "builtin",
            HandlerSpec::Webhook { .. } => "webhook",
            HandlerSpec::Command { .. } => "command",
            HandlerSpec::Drill => "drill",
        }
    }
}

/// A webhook signing secret. Its `Debug` hides the value, so that printing a [`Config`] (or a log line
/// that does) never reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub bind: IpAddr,
    pub port: u16,
    pub queues: Vec<QueueConfig>,
    /// The handler of each queue the config file declares with one other than `builtin`.
    pub handlers: BTreeMap<String, HandlerSpec>,
    /// The retry policy from MAX_ATTEMPTS and RETRY_*: what queues get unless QUEUES says otherwise.
    pub default_retry: RetryPolicy,
    pub log_format: LogFormat,
    pub log_level: slog::Level,
    pub max_body_bytes: u64,
    pub poll_interval: Duration,
    pub job_lease: Duration,
    pub job_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub db_pool_size: u32,
    /// Server-side deadline of every statement but migrations (`statement_timeout`); the client gives
    /// up a few seconds later. An API request waiting longer (for a lock a DBA holds, say) gets a 503.
    pub statement_timeout: Duration,
    /// Longest wait for a pooled connection; a request that waits longer gets a 503.
    pub db_acquire_timeout: Duration,
    pub http: HttpLimits,
    /// API tokens (from `API_TOKENS` and the file's `[auth]` table); none: the API is open.
    pub auth: crate::auth::Auth,
    /// Origins allowed to call the API from a browser; empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// `None` disables deletion of that status.
    pub retention: Retention,
    pub maintenance_interval: Duration,
    pub instance_id: String,
    /// A second listener serving `/metrics` alone; `None` serves it on the API port only.
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// The config file's `[schedules.NAME]`, written to the database at start-up (see
    /// `db::schedules::schedule_sync` for the rule).
    pub schedules: Vec<crate::schedule::ScheduleSpec>,
    /// Worker threads of the binary's runtime (`RUNTIME_THREADS`): see [`default_runtime_threads`].
    /// Programs that embed the library run it on their own runtime.
    pub runtime_threads: usize,
}

/// Bounds on what HTTP clients may hold of an instance: every connection, every wait, every byte has a
/// limit, so that slow or hostile clients cannot exhaust memory, file descriptors or connections.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLimits {
    /// Connections open at once (`MAX_CONNECTIONS`); one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time to send a request's headers; also how long an idle keep-alive connection is kept.
    pub header_timeout: Duration,
    /// Time to send a request's body.
    pub body_timeout: Duration,
    /// Requests waiting at once with `?wait=` (and remote long-polls); one more gets a 503.
    pub max_waiters: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: default_max_connections(),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_waiters: 1000,
        }
    }
}

/// Three quarters of the open-file limit (the rest is for database connections and files), at most
/// 10,000: a connection limit above the descriptor limit would fail with "too many open files"
/// instead of a clean 503.
fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            let line = l.lines().find(|l| l.starts_with("Max open files"))?.to_string();
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(1024);
    (soft / 4 * 3).clamp(64, 10_000)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub done: Option<Duration>,
    pub failed: Option<Duration>,
    pub cancelled: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Retention {
            done: Some(Duration::from_secs(7 * DAY)),
            failed: Some(Duration::from_secs(30 * DAY)),
            cancelled: Some(Duration::from_secs(7 * DAY)),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: DEFAULT_DATABASE_URL.to_string(),
            bind: IpAddr::from([0, 0, 0, 0]),
            port: 8080,
            queues: vec![QueueConfig::default()],
            handlers: BTreeMap::new(),
            default_retry: RetryPolicy::default(),
            log_format: LogFormat::Term,
            log_level: slog::Level::Info,
            max_body_bytes: 1024 * 1024,
            poll_interval: Duration::from_secs(1),
            job_lease: Duration::from_secs(30),
            job_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            db_pool_size: 10,
            statement_timeout: Duration::from_secs(10),
            db_acquire_timeout: Duration::from_secs(5),
            http: HttpLimits::default(),
            auth: crate::auth::Auth::default(),
            cors_origins: Vec::new(),
            retention: Retention::default(),
            maintenance_interval: Duration::from_secs(30),
            instance_id: generate_instance_id(),
            metrics_bind: None,
            schedules: Vec::new(),
            runtime_threads: default_runtime_threads(),
        }
    }
}

/// Half the cores, at least one. An instance's own work is a small share of a job's cost: in a drain
/// of no-op jobs PostgreSQL spends about 24 µs of CPU a job and jobqueue 7 (docs/performance.md), so
/// a thread per core (tokio's default) only lends PostgreSQL's backends, which usually share the
/// machine, more threads to compete with, and every hand-over between threads is a wake-up: on two
/// cores, two threads made 0.2 context switches a job, one thread 0.02, for 25% less of jobqueue's CPU
/// a job and drains about 6% faster, with `POST /jobs` as fast (13,800 and 14,500 requests/s against
/// 13,400 and 14,500).
pub fn default_runtime_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn generate_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "jobqueue".to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

impl Config {
    /// The database name in `database_url`, used to create it when missing.
    pub fn database_name(&self) -> Option<String> {
        crate::db::tls::parse_url(&self.database_url).ok()?.0.get_dbname().map(str::to_string)
    }

    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// What `jobqueue serve` runs for `queue`: the file's handler, else the built-in one.
    pub fn handler(&self, queue: &str) -> &HandlerSpec {
        static BUILTIN: HandlerSpec = HandlerSpec::Builtin;
        self.handlers.get(queue).unwrap_or(&BUILTIN)
    }
}

#[cfg(test)]
mod tests;
