//! Configuration: environment variables, an optional `.env` file and command-line flags (flags win).
//!
//! Every value is parsed here, once, into typed fields. A bad value is a [`ConfigError`] that names the
//! variable and what it accepts; `main` prints it on one line and exits with code 2.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;

use crate::job::RetryPolicy;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/jobqueue";
pub const DEFAULT_QUEUE: &str = "default";

/// A configuration value that cannot be used. Its `Display` is the one line printed before exit code 2.
#[derive(Debug, Error)]
#[error("invalid {name}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub expected: String,
}

fn bad(name: &'static str, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError { name, value: value.to_string(), expected: expected.into() }
}

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
    /// Concurrent jobs of the benchmark queue (at least WORKERS).
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Database the benchmark creates and drops (it must not be the service's database).
    #[arg(long, default_value = "jobqueue_bench")]
    pub database: String,
}

/// The raw settings as given. Values stay strings here so that a bad one produces an error naming the
/// environment variable, not clap's flag syntax.
#[derive(Debug, Clone, Default, Args)]
pub struct Settings {
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
    /// Most requests waiting at once with ?wait= (or long-polling).
    #[arg(long, env = "MAX_WAITERS", global = true)]
    pub max_waiters: Option<String>,
    /// Deadline of one database statement (statement_timeout), e.g. 10s.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", global = true)]
    pub db_statement_timeout: Option<String>,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Term,
    Json,
}

/// One queue served by this instance.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub bind: IpAddr,
    pub port: u16,
    pub queues: Vec<QueueConfig>,
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
    /// `None` disables deletion of that status.
    pub retention: Retention,
    pub maintenance_interval: Duration,
    pub instance_id: String,
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
            queues: vec![QueueConfig {
                name: DEFAULT_QUEUE.to_string(),
                concurrency: 8,
                retry: RetryPolicy::default(),
            }],
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
            retention: Retention::default(),
            maintenance_interval: Duration::from_secs(30),
            instance_id: generate_instance_id(),
        }
    }
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

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h 30m` or `7d`. A bare `0` is zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    humantime::parse_duration(s).ok()
}

const DURATION_FORMS: &str = "a duration such as 500ms, 30s, 5m or 2h";

fn duration(
    name: &'static str,
    raw: &Option<String>,
    default: Duration,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match parse_duration(raw) {
        Some(d) if d >= min => Ok(d),
        _ => Err(bad(name, raw, format!("{DURATION_FORMS}, at least {}", humantime::format_duration(min)))),
    }
}

fn retention(
    name: &'static str,
    raw: &Option<String>,
    default: Option<Duration>,
) -> Result<Option<Duration>, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match parse_duration(raw) {
        Some(Duration::ZERO) => Ok(None),
        Some(d) => Ok(Some(d)),
        None => Err(bad(name, raw, format!("{DURATION_FORMS}, or 0 to keep forever"))),
    }
}

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    name: &'static str,
    raw: &Option<String>,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(bad(name, raw, format!("a whole number from {min} to {max}"))),
    }
}

impl Settings {
    /// Turns the raw settings into a validated [`Config`].
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let database_url = match &self.database_url {
            None => d.database_url.clone(),
            Some(url) => {
                url.parse::<tokio_postgres::Config>().map_err(|_| {
                    bad("DATABASE_URL", url, "a PostgreSQL URL such as postgres://user@host:5432/dbname")
                })?;
                url.clone()
            }
        };
        let bind = match &self.bind {
            None => d.bind,
            Some(raw) => {
                raw.trim().parse().map_err(|_| bad("BIND", raw, "an IP address such as 0.0.0.0 or 127.0.0.1"))?
            }
        };
        let port = number("PORT", &self.port, d.port, 0, u16::MAX)?;
        let log_format = match self.log_format.as_deref().map(str::trim) {
            None | Some("term") | Some("") => LogFormat::Term,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(bad("LOG_FORMAT", other, "term or json")),
        };
        let log_level = match self.log_level.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
            None => d.log_level,
            Some(l) => match l.as_str() {
                "error" => slog::Level::Error,
                "warn" | "warning" => slog::Level::Warning,
                "info" | "" => slog::Level::Info,
                "debug" => slog::Level::Debug,
                "trace" => slog::Level::Trace,
                _ => return Err(bad("LOG_LEVEL", &l, "error, warn, info, debug or trace")),
            },
        };
        let max_body_bytes = number("MAX_BODY_BYTES", &self.max_body_bytes, d.max_body_bytes, 1024, 1 << 30)?;
        let ms = Duration::from_millis;
        let poll_interval = duration("POLL_INTERVAL", &self.poll_interval, d.poll_interval, ms(10))?;
        let job_lease = duration("JOB_LEASE", &self.job_lease, d.job_lease, ms(500))?;
        let job_timeout = duration("JOB_TIMEOUT", &self.job_timeout, d.job_timeout, ms(1))?;
        let shutdown_timeout =
            duration("SHUTDOWN_TIMEOUT", &self.shutdown_timeout, d.shutdown_timeout, Duration::ZERO)?;
        let maintenance_interval =
            duration("MAINTENANCE_INTERVAL", &self.maintenance_interval, d.maintenance_interval, ms(100))?;
        let db_pool_size = number("DB_POOL_SIZE", &self.db_pool_size, d.db_pool_size, 1, 1000)?;
        let statement_timeout =
            duration("DB_STATEMENT_TIMEOUT", &self.db_statement_timeout, d.statement_timeout, ms(100))?;
        let db_acquire_timeout =
            duration("DB_ACQUIRE_TIMEOUT", &self.db_acquire_timeout, d.db_acquire_timeout, ms(10))?;
        let http = HttpLimits {
            max_connections: number("MAX_CONNECTIONS", &self.max_connections, d.http.max_connections, 1, 1_000_000)?,
            header_timeout: duration("HTTP_HEADER_TIMEOUT", &self.http_header_timeout, d.http.header_timeout, ms(100))?,
            body_timeout: duration("HTTP_BODY_TIMEOUT", &self.http_body_timeout, d.http.body_timeout, ms(100))?,
            max_waiters: number("MAX_WAITERS", &self.max_waiters, d.http.max_waiters, 0, 1_000_000)?,
        };

        let rd = RetryPolicy::default();
        let retry = RetryPolicy {
            max_attempts: number("MAX_ATTEMPTS", &self.max_attempts, rd.max_attempts, 1, 1000)?,
            backoff: duration("RETRY_BACKOFF", &self.retry_backoff, rd.backoff, Duration::ZERO)?,
            backoff_max: duration("RETRY_BACKOFF_MAX", &self.retry_backoff_max, rd.backoff_max, Duration::ZERO)?,
            jitter: match &self.retry_jitter {
                None => rd.jitter,
                Some(raw) => match raw.trim().parse::<f64>() {
                    Ok(j) if (0.0..=1.0).contains(&j) => j,
                    _ => return Err(bad("RETRY_JITTER", raw, "a fraction from 0 to 1, e.g. 0.2")),
                },
            },
        };

        let workers = number("WORKERS", &self.workers, 8usize, 1, 10_000)?;
        let queues = match &self.queues {
            None => vec![QueueConfig { name: DEFAULT_QUEUE.to_string(), concurrency: workers, retry: retry.clone() }],
            Some(raw) => parse_queues(raw, &retry)?,
        };

        let rt = Retention::default();
        let retention = Retention {
            done: retention("RETENTION_DONE", &self.retention_done, rt.done)?,
            failed: retention("RETENTION_FAILED", &self.retention_failed, rt.failed)?,
            cancelled: retention("RETENTION_CANCELLED", &self.retention_cancelled, rt.cancelled)?,
        };
        let instance_id = match &self.instance_id {
            None => d.instance_id.clone(),
            Some(id) if !id.trim().is_empty() && id.len() <= 200 => id.trim().to_string(),
            Some(id) => return Err(bad("INSTANCE_ID", id, "a non-empty name of at most 200 characters")),
        };

        let config = Config {
            database_url,
            bind,
            port,
            queues,
            default_retry: retry,
            log_format,
            log_level,
            max_body_bytes,
            poll_interval,
            job_lease,
            job_timeout,
            shutdown_timeout,
            db_pool_size,
            statement_timeout,
            db_acquire_timeout,
            http,
            retention,
            maintenance_interval,
            instance_id,
        };
        Ok(config)
    }
}

const QUEUES_FORM: &str = "comma-separated name:concurrency[:max_attempts=N][:backoff=DURATION][:backoff_max=DURATION][:jitter=F], e.g. default:8,email:2";

/// Parses `QUEUES`, e.g. `default:8,email:2:max_attempts=3:backoff=5s`.
pub fn parse_queues(raw: &str, defaults: &RetryPolicy) -> Result<Vec<QueueConfig>, ConfigError> {
    let err = || bad("QUEUES", raw, QUEUES_FORM);
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for spec in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut parts = spec.split(':');
        let name = parts.next().map(str::trim).filter(|n| !n.is_empty() && n.len() <= 128).ok_or_else(err)?;
        let concurrency = match parts.next() {
            None => 1,
            Some(c) => c.trim().parse::<usize>().ok().filter(|c| (1..=10_000).contains(c)).ok_or_else(err)?,
        };
        let mut retry = defaults.clone();
        for opt in parts {
            let (key, value) = opt.split_once('=').ok_or_else(err)?;
            match key.trim() {
                "max_attempts" => {
                    retry.max_attempts = value.parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(err)?
                }
                "backoff" => retry.backoff = parse_duration(value).ok_or_else(err)?,
                "backoff_max" => retry.backoff_max = parse_duration(value).ok_or_else(err)?,
                "jitter" => {
                    retry.jitter = value.parse().ok().filter(|j: &f64| (0.0..=1.0).contains(j)).ok_or_else(err)?
                }
                _ => return Err(err()),
            }
        }
        if seen.insert(name.to_string(), ()).is_some() {
            return Err(bad("QUEUES", raw, format!("each queue once ({name} appears twice)")));
        }
        out.push(QueueConfig { name: name.to_string(), concurrency, retry });
    }
    if out.is_empty() {
        return Err(err());
    }
    Ok(out)
}

impl Config {
    /// The database name in `database_url`, used to create it when missing.
    pub fn database_name(&self) -> Option<String> {
        self.database_url.parse::<tokio_postgres::Config>().ok()?.get_dbname().map(str::to_string)
    }

    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_documented_forms() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("30"), None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let s = Settings { port: Some("http".into()), ..Default::default() };
        let e = s.resolve().unwrap_err();
        assert_eq!(e.name, "PORT");
        assert!(e.to_string().starts_with("invalid PORT=\"http\": expected a whole number"), "{e}");

        let s = Settings { workers: Some("0".into()), ..Default::default() };
        assert_eq!(s.resolve().unwrap_err().name, "WORKERS");
        let s = Settings { poll_interval: Some("fast".into()), ..Default::default() };
        assert_eq!(s.resolve().unwrap_err().name, "POLL_INTERVAL");
        let s = Settings { log_format: Some("xml".into()), ..Default::default() };
        assert_eq!(s.resolve().unwrap_err().name, "LOG_FORMAT");
    }

    #[test]
    fn queues_parse_with_options() {
        let q = parse_queues("default:8, email:2:max_attempts=3:backoff=5s,reports", &RetryPolicy::default()).unwrap();
        assert_eq!(q.len(), 3);
        assert_eq!(q[1].name, "email");
        assert_eq!(q[1].concurrency, 2);
        assert_eq!(q[1].retry.max_attempts, 3);
        assert_eq!(q[1].retry.backoff, Duration::from_secs(5));
        assert_eq!(q[2].concurrency, 1);
        assert!(parse_queues("a:1,a:2", &RetryPolicy::default()).is_err());
        assert!(parse_queues("a:x", &RetryPolicy::default()).is_err());
        assert!(parse_queues("a:1:colour=red", &RetryPolicy::default()).is_err());
    }

    #[test]
    fn workers_is_shorthand_for_the_default_queue() {
        let s = Settings { workers: Some("3".into()), ..Default::default() };
        let c = s.resolve().unwrap();
        assert_eq!(c.queues.len(), 1);
        assert_eq!(c.queues[0].name, "default");
        assert_eq!(c.queues[0].concurrency, 3);
    }

    #[test]
    fn zero_retention_disables_deletion() {
        let s = Settings { retention_done: Some("0".into()), ..Default::default() };
        assert_eq!(s.resolve().unwrap().retention.done, None);
    }
}
