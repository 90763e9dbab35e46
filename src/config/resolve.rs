//! The resolved configuration: merges flags, environment and the config file, and parses every value
//! once into the typed [`Config`].
//!
//! Precedence, highest first: flags, environment variables, `.env`, the config file, defaults. Queues:
//! `QUEUES`, when set, decides which queues this instance serves and may override their concurrency
//! and retry options; a queue it names that the file also declares keeps the file's handler, timeout
//! and the settings `QUEUES` does not give. Without `QUEUES`, the file's `[queues.*]` are served;
//! without either, the `default` queue with `WORKERS` slots.

use std::collections::BTreeMap;
use std::time::Duration;

use super::cli::Settings;
use super::file::{self, FileConfig};
use super::{Config, ConfigError, HttpLimits, LogFormat, QueueConfig, Retention, DEFAULT_QUEUE};
use crate::job::RetryPolicy;
use crate::limits::{
    CONCURRENCY_RANGE, DB_ACQUIRE_TIMEOUT_MIN, DB_POOL_SIZE_RANGE, HTTP_TIMEOUT_MIN, INSTANCE_ID_MAX, JITTER_RANGE,
    JOB_LEASE_MIN, JOB_TIMEOUT_MIN, MAINTENANCE_INTERVAL_MIN, MAX_ATTEMPTS_RANGE, MAX_BODY_BYTES_RANGE,
    MAX_CONNECTIONS_RANGE, MAX_WAITERS_RANGE, POLL_INTERVAL_MIN, QUEUE_NAME_MAX, RUNTIME_THREADS_RANGE,
    STATEMENT_TIMEOUT_MIN,
};

fn bad(name: &'static str, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError::Value { name, value: value.to_string(), expected: expected.into() }
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h 30m` or `7d`. A bare `0` is zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    humantime::parse_duration(s).ok()
}

pub(super) const DURATION_FORMS: &str = "a duration such as 500ms, 30s, 5m or 2h";

/// A duration of at least `min`; the error is what is expected.
pub(super) fn check_duration(raw: &str, min: Duration) -> Result<Duration, String> {
    match parse_duration(raw) {
        Some(d) if d >= min => Ok(d),
        _ => Err(format!("{DURATION_FORMS}, at least {}", humantime::format_duration(min))),
    }
}

fn duration(
    name: &'static str,
    raw: &Option<String>,
    default: Duration,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    check_duration(raw, min).map_err(|expected| bad(name, raw, expected))
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
    (min, max): (T, T),
) -> Result<T, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(bad(name, raw, format!("a whole number from {min} to {max}"))),
    }
}

fn jitter(raw: &str) -> Option<f64> {
    raw.trim().parse().ok().filter(|j: &f64| (JITTER_RANGE.0..=JITTER_RANGE.1).contains(j))
}

impl Settings {
    /// Reads the config file, if one is given, and turns everything into a validated [`Config`].
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let Some(path) = &self.config else { return self.resolve_with(None) };
        let file = file::load(path)?;
        // The file only fills in what flags and the environment leave unset.
        let mut merged = self.clone();
        let mut from_file = Vec::new();
        for (key, value) in &file.settings {
            let slot = merged.file_slot(key).expect("file keys are settings");
            if slot.is_none() {
                *slot = Some(value.clone());
                from_file.push(*key);
            }
        }
        merged.resolve_with(Some(&file)).map_err(|e| match e {
            // A bad value the file gave is reported as the file's, under its key there.
            ConfigError::Value { name, value, expected } if from_file.iter().any(|k| k.eq_ignore_ascii_case(name)) => {
                ConfigError::File {
                    path: path.clone(),
                    message: format!("{}: expected {expected}, got {value:?}", name.to_ascii_lowercase()),
                }
            }
            e => e,
        })
    }

    fn resolve_with(&self, file: Option<&FileConfig>) -> Result<Config, ConfigError> {
        let d = Config::default();
        let database_url = match &self.database_url {
            None => d.database_url.clone(),
            Some(url) => {
                crate::db::tls::parse_url(url).map_err(|_| {
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
        let port = number("PORT", &self.port, d.port, (0, u16::MAX))?;
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
        let max_body_bytes = number("MAX_BODY_BYTES", &self.max_body_bytes, d.max_body_bytes, MAX_BODY_BYTES_RANGE)?;
        let poll_interval = duration("POLL_INTERVAL", &self.poll_interval, d.poll_interval, POLL_INTERVAL_MIN)?;
        let job_lease = duration("JOB_LEASE", &self.job_lease, d.job_lease, JOB_LEASE_MIN)?;
        let job_timeout = duration("JOB_TIMEOUT", &self.job_timeout, d.job_timeout, JOB_TIMEOUT_MIN)?;
        let shutdown_timeout =
            duration("SHUTDOWN_TIMEOUT", &self.shutdown_timeout, d.shutdown_timeout, Duration::ZERO)?;
        let maintenance_interval = duration(
            "MAINTENANCE_INTERVAL",
            &self.maintenance_interval,
            d.maintenance_interval,
            MAINTENANCE_INTERVAL_MIN,
        )?;
        let db_pool_size = number("DB_POOL_SIZE", &self.db_pool_size, d.db_pool_size, DB_POOL_SIZE_RANGE)?;
        let statement_timeout =
            duration("DB_STATEMENT_TIMEOUT", &self.db_statement_timeout, d.statement_timeout, STATEMENT_TIMEOUT_MIN)?;
        let db_acquire_timeout =
            duration("DB_ACQUIRE_TIMEOUT", &self.db_acquire_timeout, d.db_acquire_timeout, DB_ACQUIRE_TIMEOUT_MIN)?;
        let http = HttpLimits {
            max_connections: number(
                "MAX_CONNECTIONS",
                &self.max_connections,
                d.http.max_connections,
                MAX_CONNECTIONS_RANGE,
            )?,
            header_timeout: duration(
                "HTTP_HEADER_TIMEOUT",
                &self.http_header_timeout,
                d.http.header_timeout,
                HTTP_TIMEOUT_MIN,
            )?,
            body_timeout: duration(
                "HTTP_BODY_TIMEOUT",
                &self.http_body_timeout,
                d.http.body_timeout,
                HTTP_TIMEOUT_MIN,
            )?,
            max_waiters: number("MAX_WAITERS", &self.max_waiters, d.http.max_waiters, MAX_WAITERS_RANGE)?,
        };

        let rd = RetryPolicy::default();
        let retry = RetryPolicy {
            max_attempts: number("MAX_ATTEMPTS", &self.max_attempts, rd.max_attempts, MAX_ATTEMPTS_RANGE)?,
            backoff: duration("RETRY_BACKOFF", &self.retry_backoff, rd.backoff, Duration::ZERO)?,
            backoff_max: duration("RETRY_BACKOFF_MAX", &self.retry_backoff_max, rd.backoff_max, Duration::ZERO)?,
            jitter: match &self.retry_jitter {
                None => rd.jitter,
                Some(raw) => jitter(raw).ok_or_else(|| {
                    let (min, max) = JITTER_RANGE;
                    bad("RETRY_JITTER", raw, format!("a fraction from {min} to {max}, e.g. 0.2"))
                })?,
            },
        };

        let workers = number("WORKERS", &self.workers, QueueConfig::default().concurrency, CONCURRENCY_RANGE)?;
        let file_queues: Vec<QueueConfig> = file
            .map(|f| {
                f.queues
                    .iter()
                    .map(|q| QueueConfig {
                        name: q.name.clone(),
                        concurrency: q.concurrency.unwrap_or(workers),
                        retry: RetryPolicy {
                            max_attempts: q.max_attempts.unwrap_or(retry.max_attempts),
                            backoff: q.backoff.unwrap_or(retry.backoff),
                            backoff_max: q.backoff_max.unwrap_or(retry.backoff_max),
                            jitter: q.jitter.unwrap_or(retry.jitter),
                        },
                        timeout: q.timeout,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let queues = match &self.queues {
            Some(raw) => parse_queues_over(raw, &retry, &file_queues)?,
            None if !file_queues.is_empty() => file_queues,
            None => vec![QueueConfig { retry: retry.clone(), ..QueueConfig::new(DEFAULT_QUEUE, workers) }],
        };
        let handlers =
            file.map(|f| f.queues.iter().map(|q| (q.name.clone(), q.handler.clone())).collect()).unwrap_or_default();

        let rt = Retention::default();
        let retention = Retention {
            done: retention("RETENTION_DONE", &self.retention_done, rt.done)?,
            failed: retention("RETENTION_FAILED", &self.retention_failed, rt.failed)?,
            cancelled: retention("RETENTION_CANCELLED", &self.retention_cancelled, rt.cancelled)?,
        };
        // Tokens from the environment and from the file's [auth] table all count. A bad API_TOKENS is
        // reported without echoing it: it holds secrets.
        let mut tokens = match &self.api_tokens {
            None => Vec::new(),
            Some(raw) => crate::auth::Auth::parse_env(raw).map_err(|expected| ConfigError::Value {
                name: "API_TOKENS",
                value: "(not shown)".into(),
                expected,
            })?,
        };
        tokens.extend(file.map(|f| f.auth.clone()).unwrap_or_default());
        let auth = crate::auth::Auth::new(tokens);
        let cors_origins = match &self.cors_origins {
            None => Vec::new(),
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(|o| match o.starts_with("http://") || o.starts_with("https://") {
                    true => Ok(o.trim_end_matches('/').to_string()),
                    false => Err(bad("CORS_ORIGINS", raw, "comma-separated origins such as https://ops.example.com")),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let instance_id = match &self.instance_id {
            None => d.instance_id.clone(),
            Some(id) if !id.trim().is_empty() && id.len() <= INSTANCE_ID_MAX => id.trim().to_string(),
            Some(id) => {
                return Err(bad("INSTANCE_ID", id, format!("a non-empty name of at most {INSTANCE_ID_MAX} characters")))
            }
        };

        let metrics_bind =
            match self.metrics_bind.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(raw) => Some(raw.parse().map_err(|_| {
                    bad("METRICS_BIND", raw, "an address and port such as 0.0.0.0:9090 or 127.0.0.1:9090")
                })?),
            };

        Ok(Config {
            database_url,
            bind,
            port,
            queues,
            handlers,
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
            auth,
            cors_origins,
            metrics_bind,
            schedules: file.map(|f| f.schedules.clone()).unwrap_or_default(),
            runtime_threads: number(
                "RUNTIME_THREADS",
                &self.runtime_threads,
                d.runtime_threads,
                RUNTIME_THREADS_RANGE,
            )?,
        })
    }
}

const QUEUES_FORM: &str = "comma-separated name:concurrency[:max_attempts=N][:backoff=DURATION][:backoff_max=DURATION][:jitter=F], e.g. default:8,email:2";

/// Parses `QUEUES`, e.g. `default:8,email:2:max_attempts=3:backoff=5s`.
pub fn parse_queues(raw: &str, defaults: &RetryPolicy) -> Result<Vec<QueueConfig>, ConfigError> {
    parse_queues_over(raw, defaults, &[])
}

/// Parses `QUEUES` over the queues a config file declares: a queue named in both starts from the file's
/// settings, and `QUEUES` overrides those it gives (a left-out concurrency keeps the file's).
fn parse_queues_over(raw: &str, defaults: &RetryPolicy, base: &[QueueConfig]) -> Result<Vec<QueueConfig>, ConfigError> {
    let err = || bad("QUEUES", raw, QUEUES_FORM);
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for spec in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut parts = spec.split(':');
        let name =
            parts.next().map(str::trim).filter(|n| !n.is_empty() && n.len() <= QUEUE_NAME_MAX).ok_or_else(err)?;
        let mut queue = match base.iter().find(|q| q.name == name) {
            Some(q) => q.clone(),
            None => QueueConfig { retry: defaults.clone(), ..QueueConfig::new(name, 1) },
        };
        if let Some(c) = parts.next() {
            queue.concurrency = c
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|c| (CONCURRENCY_RANGE.0..=CONCURRENCY_RANGE.1).contains(c))
                .ok_or_else(err)?;
        }
        let retry = &mut queue.retry;
        for opt in parts {
            let (key, value) = opt.split_once('=').ok_or_else(err)?;
            match key.trim() {
                "max_attempts" => {
                    retry.max_attempts = value
                        .parse()
                        .ok()
                        .filter(|n| (MAX_ATTEMPTS_RANGE.0..=MAX_ATTEMPTS_RANGE.1).contains(n))
                        .ok_or_else(err)?
                }
                "backoff" => retry.backoff = parse_duration(value).ok_or_else(err)?,
                "backoff_max" => retry.backoff_max = parse_duration(value).ok_or_else(err)?,
                "jitter" => retry.jitter = jitter(value).ok_or_else(err)?,
                _ => return Err(err()),
            }
        }
        if seen.insert(name.to_string(), ()).is_some() {
            return Err(bad("QUEUES", raw, format!("each queue once ({name} appears twice)")));
        }
        out.push(queue);
    }
    if out.is_empty() {
        return Err(err());
    }
    Ok(out)
}
