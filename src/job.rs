//! Job types, the status machine and the retry policy. No I/O lives here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The limits live with the configuration's in `limits`, each defined once; re-exported here, where
/// the job fields they bound are.
pub use crate::limits::{MAX_ATTEMPTS_RANGE, MAX_DELAY, PRIORITY_RANGE, QUEUE_NAME_MAX, UNIQUE_KEY_MAX};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Created with parents (`after`) not all done yet; becomes pending when they are.
    Waiting,
    Pending,
    Processing,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Processing,
        JobStatus::Done,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a status name, accepting the older service's names `todo` and `in_progress`.
    pub fn parse(s: &str) -> Option<JobStatus> {
        match s {
            "waiting" => Some(JobStatus::Waiting),
            "pending" | "todo" => Some(JobStatus::Pending),
            "processing" | "in_progress" => Some(JobStatus::Processing),
            "done" => Some(JobStatus::Done),
            "failed" => Some(JobStatus::Failed),
            "cancelled" | "canceled" => Some(JobStatus::Cancelled),
            _ => None,
        }
    }

    /// A status as stored in the `status` column: the six names only, no aliases.
    pub fn from_stored(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Done, failed and cancelled are final until someone retries the job.
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled)
    }

    /// The transitions of `docs/state_machine.md`, which names the statement in `db::queries` that
    /// makes each. Kept here so the table and the code review of a new statement have one reference.
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Pending, Processing)            // worker claim
                | (Waiting, Pending)         // every parent done: completion, rescue
                | (Waiting, Cancelled)       // a parent failed or was cancelled; API cancel
                | (Pending, Cancelled)       // API cancel
                | (Processing, Done)         // handler succeeded
                | (Processing, Pending)      // retry with backoff, snooze, shutdown release, rescue
                | (Processing, Failed)       // attempts exhausted or permanent failure, rescue
                | (Processing, Cancelled)    // cancellation observed by the worker or the rescuer
                | (Failed, Pending)          // API retry
                | (Cancelled, Pending) // API retry
        )
    }
}

/// Stored as text; reading anything but the six names is an error (a schema this code does not know),
/// never silently some other status.
impl tokio_postgres::types::FromSql<'_> for JobStatus {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &[u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let s = <&str as tokio_postgres::types::FromSql>::from_sql(ty, raw)?;
        JobStatus::from_stored(s).ok_or_else(|| format!("unknown job status {s:?}").into())
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::FromSql>::accepts(ty)
    }
}

impl tokio_postgres::types::ToSql for JobStatus {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.as_str().to_sql(ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A row of `jobs`, as the API shows it and handlers receive it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub queue: String,
    pub payload: Value,
    pub status: JobStatus,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub errors: Value,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub attempts: i32,
    pub max_attempts: Option<i32>,
    pub unique_key: Option<String>,
    pub locked_by: Option<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the latest attempt was claimed; None before the first.
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A job to insert. Built by the API from a request, or by library users directly.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub queue: String,
    pub payload: Value,
    pub priority: i32,
    /// `None` means now (the database's clock).
    pub run_at: Option<DateTime<Utc>>,
    /// `None` means the queue's default.
    pub max_attempts: Option<i32>,
    pub unique_key: Option<String>,
    /// Jobs that must be done before this one runs (at most [`MAX_PARENTS`]).
    pub after: Vec<Parent>,
}

/// The most parents one job may wait for.
pub const MAX_PARENTS: usize = 100;

/// A job's parent, as a request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parent {
    /// An existing job.
    Job(Uuid),
    /// An earlier element of the same batch (`"$2"`).
    Earlier(usize),
}

impl NewJob {
    pub fn new(payload: Value) -> NewJob {
        NewJob {
            queue: crate::config::DEFAULT_QUEUE.to_string(),
            payload,
            priority: 0,
            run_at: None,
            max_attempts: None,
            unique_key: None,
            after: Vec::new(),
        }
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Checks every field against the schema's constraints so that the caller learns which field is
    /// wrong before anything reaches the database.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.queue.is_empty() || self.queue.len() > QUEUE_NAME_MAX {
            return Err(FieldError::new("queue", format!("must be 1 to {QUEUE_NAME_MAX} bytes long")));
        }
        if self.queue.contains('\0') {
            return Err(FieldError::new("queue", "must not contain NUL characters"));
        }
        if !(PRIORITY_RANGE.0..=PRIORITY_RANGE.1).contains(&self.priority) {
            return Err(FieldError::new(
                "priority",
                format!("must be between {} and {} (lower runs first)", PRIORITY_RANGE.0, PRIORITY_RANGE.1),
            ));
        }
        if let Some(m) = self.max_attempts {
            if !(MAX_ATTEMPTS_RANGE.0..=MAX_ATTEMPTS_RANGE.1).contains(&m) {
                return Err(FieldError::new(
                    "max_attempts",
                    format!("must be between {} and {}", MAX_ATTEMPTS_RANGE.0, MAX_ATTEMPTS_RANGE.1),
                ));
            }
        }
        if let Some(k) = &self.unique_key {
            if k.is_empty() || k.len() > UNIQUE_KEY_MAX || k.contains('\0') {
                return Err(FieldError::new("unique_key", format!("must be 1 to {UNIQUE_KEY_MAX} bytes, no NUL")));
            }
        }
        if let Some(at) = self.run_at {
            if !representable(at) {
                return Err(FieldError::new("run_at", "must be a time in the years 0000 to 9999 (RFC 3339)"));
            }
        }
        if contains_nul(&self.payload) {
            // Postgres' jsonb cannot store U+0000; refuse it here rather than let the insert fail.
            return Err(FieldError::new("payload", "must not contain \\u0000 (PostgreSQL jsonb cannot store it)"));
        }
        Ok(())
    }
}

/// Whether a time can be written in RFC 3339, which has four-digit years: the API answers with every
/// time it stores, and a year like +262000 would come back in a form clients cannot parse.
pub fn representable(at: DateTime<Utc>) -> bool {
    use chrono::Datelike;
    (0..=9999).contains(&at.year())
}

/// Whether a JSON value holds U+0000 anywhere, which PostgreSQL's jsonb cannot store.
pub fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(contains_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// A field that failed validation and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// How a queue retries failed attempts.
///
/// Defaults: 10 attempts, backoff 2s doubling per attempt, capped at 10 minutes, ±20% jitter. The nine
/// waits between attempts then add up to about 17 minutes (2+4+...+512 s): long enough to ride out a
/// deploy or a brief outage of a downstream service, short enough that a persistent bug surfaces as
/// `failed` the same hour rather than retrying quietly for a day (River's and graphile-worker's 25
/// attempts span days).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Fraction of the delay added or removed at random, so that jobs failing together do not retry
    /// together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            backoff: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Delay before the attempt after `attempt` (1-based) failed: `backoff * 2^(attempt-1)`, capped,
    /// then spread by the jitter.
    pub fn backoff_after(&self, attempt: i32) -> Duration {
        let exp = attempt.clamp(1, 32) as u32 - 1;
        let base = self.backoff.saturating_mul(1u32 << exp.min(31)).min(self.backoff_max);
        let spread = 1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0);
        Duration::try_from_secs_f64(base.as_secs_f64() * spread.max(0.0)).unwrap_or(base).min(MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn aliases_parse() {
        assert_eq!(JobStatus::parse("todo"), Some(JobStatus::Pending));
        assert_eq!(JobStatus::parse("in_progress"), Some(JobStatus::Processing));
        assert_eq!(JobStatus::parse("nope"), None);
    }

    #[test]
    fn finished_jobs_only_go_back_by_retry() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_finished()) {
            for to in JobStatus::ALL {
                let allowed = from.can_become(to);
                assert_eq!(allowed, from != JobStatus::Done && to == JobStatus::Pending, "{from} -> {to}");
            }
        }
        assert!(!JobStatus::Pending.can_become(JobStatus::Done));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy { jitter: 0.0, backoff: Duration::from_secs(1), ..RetryPolicy::default() };
        assert_eq!(p.backoff_after(1), Duration::from_secs(1));
        assert_eq!(p.backoff_after(2), Duration::from_secs(2));
        assert_eq!(p.backoff_after(5), Duration::from_secs(16));
        assert_eq!(p.backoff_after(30), Duration::from_secs(600));
        let d = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
        let total: Duration = (1..10).map(|a| d.backoff_after(a)).sum();
        assert_eq!(total, Duration::from_secs(1022), "the documented ~17 minutes of retries");
        let j = RetryPolicy { backoff: Duration::from_secs(1), ..RetryPolicy::default() };
        for _ in 0..100 {
            let d = j.backoff_after(3);
            assert!(d >= Duration::from_millis(3200) && d <= Duration::from_millis(4800), "{d:?}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(NewJob::new(json!({"a": "x\u{0}"})).validate().unwrap_err().field, "payload");
        let mut j = NewJob::new(json!(1));
        j.priority = 5000;
        assert_eq!(j.validate().unwrap_err().field, "priority");
        let j = NewJob::new(json!(1)).queue("");
        assert_eq!(j.validate().unwrap_err().field, "queue");
        assert!(NewJob::new(json!("Process this data")).validate().is_ok());
    }
}
