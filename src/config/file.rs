//! The file layer: an optional TOML file (`--config PATH` / `JOBQUEUE_CONFIG`).
//!
//! ```toml
//! job_timeout = "1m"                # any setting, under its environment variable's name in lower case
//! [queues.email]
//! concurrency = 32
//! handler = "webhook"               # builtin (the default), webhook, command or drill
//! url = "https://mailer.internal/jobs"
//! secret_env = "EMAIL_HOOK_SECRET"  # or secret = "..."
//! ```
//!
//! The file is walked by hand rather than through serde's derive so that every error names the queue
//! and the key, and says what the key accepts; the TOML crate's own errors (with line and column) are
//! kept for syntax. Values are checked here against [`crate::limits`], exactly as the environment's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use super::cli::Settings;
use super::resolve::{check_duration, DURATION_FORMS};
use super::{ConfigError, HandlerSpec, Secret};
use crate::auth::{Scope, TokenHash};
use crate::limits::{CONCURRENCY_RANGE, JITTER_RANGE, JOB_TIMEOUT_MIN, MAX_ATTEMPTS_RANGE, QUEUE_NAME_MAX};
use crate::schedule::{Missed, ScheduleSpec};

/// The keys of a `[queues.NAME]` table.
pub const QUEUE_KEYS: &[&str] = &[
    "concurrency",
    "handler",
    "max_attempts",
    "backoff",
    "backoff_max",
    "jitter",
    "timeout",
    "url",
    "secret",
    "secret_env",
    "command",
];

/// A parsed and checked config file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileConfig {
    pub path: PathBuf,
    /// Top-level settings as `(key, value)`, the value as it would be written in the environment.
    pub settings: Vec<(&'static str, String)>,
    /// In the order of their names.
    pub queues: Vec<FileQueue>,
    /// `[auth] tokens = [{ scope = "admin", sha256 = "<hex>" }, ...]`: hashes only, never tokens.
    pub auth: Vec<(Scope, TokenHash)>,
    /// `[schedules.NAME]` tables, in the order of their names, checked as the API checks them.
    pub schedules: Vec<ScheduleSpec>,
}

/// The keys of a `[schedules.NAME]` table.
pub const SCHEDULE_KEYS: &[&str] = &["cron", "timezone", "queue", "payload", "priority", "max_attempts", "missed"];

/// One `[queues.NAME]` table. `None` leaves the setting to the instance-wide value.
#[derive(Debug, Clone, PartialEq)]
pub struct FileQueue {
    pub name: String,
    pub concurrency: Option<usize>,
    pub max_attempts: Option<i32>,
    pub backoff: Option<Duration>,
    pub backoff_max: Option<Duration>,
    pub jitter: Option<f64>,
    pub timeout: Option<Duration>,
    pub handler: HandlerSpec,
}

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::File { path: path.to_path_buf(), message: format!("cannot read it: {e}") })?;
    parse(path, &text)
}

/// Checks `text` as the contents of the file at `path` (named in errors). `secret_env` is read from
/// this process's environment.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let err = |message: String| ConfigError::File { path: path.to_path_buf(), message };
    let table: Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string().trim_end().to_string()))?;
    let mut config = FileConfig { path: path.to_path_buf(), ..FileConfig::default() };
    for (key, value) in table {
        if key == "auth" {
            config.auth = parse_auth(value).map_err(|m| err(format!("[auth] {m}")))?;
            continue;
        }
        if key == "schedules" {
            let Value::Table(schedules) = value else {
                return Err(err(format!("schedules: expected [schedules.NAME] tables, got {}", describe(&value))));
            };
            for (name, schedule) in schedules {
                let Value::Table(schedule) = schedule else {
                    return Err(err(format!("schedules.{name}: expected a table, got {}", describe(&schedule))));
                };
                let spec = parse_schedule(&name, schedule).map_err(|m| err(format!("[schedules.{name}] {m}")))?;
                config.schedules.push(spec);
            }
            continue;
        }
        if key == "queues" {
            let Value::Table(queues) = value else {
                return Err(err(format!(
                    "queues: expected [queues.NAME] tables, got {}; the name:concurrency form belongs in QUEUES",
                    describe(&value)
                )));
            };
            for (name, queue) in queues {
                let Value::Table(queue) = queue else {
                    return Err(err(format!("queues.{name}: expected a table, got {}", describe(&queue))));
                };
                config.queues.push(parse_queue(&name, queue).map_err(|m| err(format!("[queues.{name}] {m}")))?);
            }
            continue;
        }
        let Some(known) = Settings::FILE_KEYS.iter().find(|k| **k == key) else {
            return Err(err(format!(
                "unknown key {key:?} (expected [queues.NAME] tables or one of: {})",
                Settings::FILE_KEYS.join(", ")
            )));
        };
        let value = match value {
            Value::String(s) => s,
            Value::Integer(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            other => return Err(err(format!("{key}: expected a string or a number, got {}", describe(&other)))),
        };
        config.settings.push((known, value));
    }
    Ok(config)
}

/// The `[auth]` table: a list of tokens by the SHA-256 of each (`printf %s "$TOKEN" | sha256sum`), so
/// that the file holds nothing that would let its reader call the API.
fn parse_auth(value: Value) -> Result<Vec<(Scope, TokenHash)>, String> {
    let Value::Table(mut t) = value else { return Err(format!("expected a table, got {}", describe(&value))) };
    if let Some(key) = t.keys().find(|k| k.as_str() != "tokens") {
        return Err(format!("unknown key {key:?} (expected tokens)"));
    }
    let Some(Value::Array(entries)) = t.remove("tokens") else {
        return Err("tokens: expected an array of { scope, sha256 } tables".into());
    };
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let Value::Table(e) = entry else {
                return Err(format!("tokens[{i}]: expected a {{ scope, sha256 }} table"));
            };
            if let Some(key) = e.keys().find(|k| !matches!(k.as_str(), "scope" | "sha256")) {
                let hint = if key == "token" { "; give the token's SHA-256 as sha256, never the token" } else { "" };
                return Err(format!("tokens[{i}]: unknown key {key:?} (expected scope, sha256){hint}"));
            }
            let scope = match e.get("scope") {
                Some(Value::String(s)) => Scope::parse(s),
                _ => None,
            }
            .ok_or(format!("tokens[{i}].scope: expected read, write, worker or admin"))?;
            let hash = match e.get("sha256") {
                Some(Value::String(s)) => TokenHash::from_hex(s),
                _ => None,
            }
            .ok_or(format!("tokens[{i}].sha256: expected the token's SHA-256 as 64 hex digits"))?;
            Ok((scope, hash))
        })
        .collect()
}

/// What a value is, for error messages: its type and, for scalars, the value.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the number {f}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the date {d}"),
        Value::Array(_) => "an array".to_string(),
        Value::Table(_) => "a table".to_string(),
    }
}

/// The checks of one queue's table; the error omits the `[queues.NAME]` prefix.
fn parse_queue(name: &str, mut t: Table) -> Result<FileQueue, String> {
    if name.is_empty() || name.len() > QUEUE_NAME_MAX || name.contains('\0') {
        return Err(format!("the queue name must be 1 to {QUEUE_NAME_MAX} bytes, without NUL"));
    }
    if let Some(key) = t.keys().find(|k| !QUEUE_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key {key:?} (expected one of: {})", QUEUE_KEYS.join(", ")));
    }
    let int = |t: &Table, key: &str, (min, max): (i64, i64)| -> Result<Option<i64>, String> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) if (min..=max).contains(i) => Ok(Some(*i)),
            Some(v) => Err(format!("{key}: expected a whole number from {min} to {max}, got {}", describe(v))),
        }
    };
    let duration = |t: &Table, key: &str, min: Duration| -> Result<Option<Duration>, String> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => {
                check_duration(s, min).map(Some).map_err(|expected| format!("{key}: expected {expected}, got {s:?}"))
            }
            Some(v) => Err(format!("{key}: expected {DURATION_FORMS} (a string), got {}", describe(v))),
        }
    };
    let string = |t: &Table, key: &str| -> Result<Option<String>, String> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!("{key}: expected a string, got {}", describe(v))),
        }
    };
    let (c_min, c_max) = CONCURRENCY_RANGE;
    let concurrency = int(&t, "concurrency", (c_min as i64, c_max as i64))?.map(|c| c as usize);
    let max_attempts =
        int(&t, "max_attempts", (MAX_ATTEMPTS_RANGE.0.into(), MAX_ATTEMPTS_RANGE.1.into()))?.map(|n| n as i32);
    let backoff = duration(&t, "backoff", Duration::ZERO)?;
    let backoff_max = duration(&t, "backoff_max", Duration::ZERO)?;
    let timeout = duration(&t, "timeout", JOB_TIMEOUT_MIN)?;
    let jitter = match t.get("jitter") {
        None => None,
        Some(Value::Float(j)) if (JITTER_RANGE.0..=JITTER_RANGE.1).contains(j) => Some(*j),
        Some(Value::Integer(j)) if (JITTER_RANGE.0..=JITTER_RANGE.1).contains(&(*j as f64)) => Some(*j as f64),
        Some(v) => {
            let (min, max) = JITTER_RANGE;
            return Err(format!("jitter: expected a fraction from {min} to {max}, e.g. 0.2, got {}", describe(v)));
        }
    };

    let kind = string(&t, "handler")?.unwrap_or_else(|| "builtin".to_string());
    // Keys of another kind are refused rather than ignored: a `url` on a command queue is a mistake
    // that would otherwise surface only as jobs that never reach the URL.
    let only_for = |keys: &[&str], for_kind: &str| -> Result<(), String> {
        match keys.iter().find(|k| t.contains_key(**k)) {
            Some(k) if kind != for_kind => Err(format!("{k}: applies only to handler = {for_kind:?}")),
            _ => Ok(()),
        }
    };
    only_for(&["url", "secret", "secret_env"], "webhook")?;
    only_for(&["command"], "command")?;
    let handler = match kind.as_str() {
        "builtin" => HandlerSpec::Builtin,
        "drill" => HandlerSpec::Drill,
        "webhook" => {
            let url = string(&t, "url")?.ok_or("url: required for handler = \"webhook\"")?;
            check_url(&url).map_err(|why| format!("url: {why}, got {url:?}"))?;
            let secret = match (string(&t, "secret")?, string(&t, "secret_env")?) {
                (Some(_), Some(_)) => return Err("secret, secret_env: give one of them, not both".into()),
                (None, None) => return Err("secret: required for handler = \"webhook\" (or secret_env)".into()),
                (Some(s), None) if s.is_empty() => return Err("secret: must not be empty".into()),
                (Some(s), None) => s,
                (None, Some(var)) => match std::env::var(&var) {
                    Ok(s) if !s.is_empty() => s,
                    _ => return Err(format!("secret_env: the environment variable {var} is not set or empty")),
                },
            };
            HandlerSpec::Webhook { url, secret: Secret::new(secret) }
        }
        "command" => {
            let argv = match t.remove("command") {
                None => return Err("command: required for handler = \"command\"".into()),
                Some(Value::Array(a)) => a
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) if !s.contains('\0') => Ok(s),
                        v => Err(format!("command: expected an array of strings, got {} in it", describe(&v))),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Some(v) => {
                    return Err(format!(
                    "command: expected an array of strings such as [\"./bin/resize\", \"--quality\", \"80\"], got {}",
                    describe(&v)
                ))
                }
            };
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err("command: expected a program and its arguments, got an empty command".into());
            }
            HandlerSpec::Command { argv }
        }
        other => {
            return Err(format!("handler: expected \"builtin\", \"webhook\", \"command\" or \"drill\", got {other:?}"))
        }
    };
    Ok(FileQueue { name: name.to_string(), concurrency, max_attempts, backoff, backoff_max, jitter, timeout, handler })
}

/// The checks of one schedule's table (the same as `PUT /schedules/{name}`'s); the error omits the
/// `[schedules.NAME]` prefix.
fn parse_schedule(name: &str, t: Table) -> Result<ScheduleSpec, String> {
    if let Some(key) = t.keys().find(|k| !SCHEDULE_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key {key:?} (expected one of: {})", SCHEDULE_KEYS.join(", ")));
    }
    let string = |key: &str| -> Result<Option<String>, String> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!("{key}: expected a string, got {}", describe(v))),
        }
    };
    let int = |key: &str| -> Result<Option<i32>, String> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => i32::try_from(*i).map(Some).map_err(|_| format!("{key}: {i} is out of range")),
            Some(v) => Err(format!("{key}: expected a whole number, got {}", describe(v))),
        }
    };
    let missed = match string("missed")? {
        None => Missed::default(),
        Some(m) => Missed::parse(&m).ok_or(format!("missed: expected \"skip\", \"once\" or \"all\", got {m:?}"))?,
    };
    let payload = match t.get("payload") {
        None => serde_json::json!({}),
        Some(v) => serde_json::to_value(v).map_err(|e| format!("payload: cannot be JSON: {e}"))?,
    };
    let spec = ScheduleSpec {
        name: name.to_string(),
        cron: string("cron")?.ok_or("cron: required, e.g. cron = \"0 2 * * *\"")?,
        timezone: string("timezone")?.unwrap_or_else(|| "UTC".to_string()),
        queue: string("queue")?.unwrap_or_else(|| super::DEFAULT_QUEUE.to_string()),
        payload,
        priority: int("priority")?.unwrap_or(0),
        max_attempts: int("max_attempts")?,
        missed,
    };
    spec.validate().map_err(|e| e.to_string())?;
    Ok(spec)
}

/// An absolute http or https URL with a host.
fn check_url(raw: &str) -> Result<(), &'static str> {
    let url = reqwest::Url::parse(raw).map_err(|_| "expected an absolute http or https URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("expected an http or https URL");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("expected a URL with a host");
    }
    Ok(())
}
