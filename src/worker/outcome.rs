//! How an attempt ended ([`Outcome`]) and what that means for the row ([`finish_for`]): the one
//! translation from a handler's answer and the queue's retry policy to the write, shared by the
//! in-process completer and the remote finisher.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::db::queries::Finish;
use crate::db::RowAddress;
use crate::job::{Job, JobStatus, RetryPolicy, MAX_DELAY};

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Done(Value),
    /// Retryable: handler error, panic or timeout.
    Error {
        message: String,
        after: Option<Duration>,
    },
    /// Permanent failure asked for by the handler.
    Fail(String),
    Snooze(Duration),
    Cancelled,
    /// The lease went to someone else; nothing may be written.
    LeaseLost,
    /// Interrupted by shutdown; back to pending without counting the attempt.
    Released,
}

/// What the completer needs of a claimed job; the job itself (payload and all) goes to the handler.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Attempt {
    pub id: Uuid,
    pub queue: String,
    /// `attempts` as claimed: this attempt's number.
    pub number: i32,
    pub max_attempts: Option<i32>,
    /// Where the claim left the job's row, for the completer (see [`crate::db::RowAddress`]).
    pub row: Option<RowAddress>,
}

impl Attempt {
    pub(crate) fn of(job: &Job, row: Option<RowAddress>) -> Attempt {
        Attempt { id: job.id, queue: job.queue.clone(), number: job.attempts, max_attempts: job.max_attempts, row }
    }
}

/// What to write for an outcome, given the attempt and its queue's retry policy. `None` for a lost
/// lease: that attempt's result belongs to no one.
pub(crate) fn finish_for(attempt: &Attempt, outcome: Outcome, policy: &RetryPolicy) -> Option<Finish> {
    let base = Finish {
        id: attempt.id,
        attempt: attempt.number,
        status: JobStatus::Pending,
        result: None,
        error: None,
        delay: Duration::ZERO,
        uncount: false,
        row: attempt.row,
    };
    let max_attempts = attempt.max_attempts.unwrap_or(policy.max_attempts);
    // PostgreSQL stores no U+0000 in text or jsonb; a value it refuses would fail the whole batch.
    let text = |m: &str| m.replace('\0', "\u{FFFD}");
    Some(match outcome {
        Outcome::Done(v) if crate::job::contains_nul(&v) => Finish {
            status: JobStatus::Failed,
            error: Some("handler result cannot be stored: it contains U+0000".into()),
            ..base
        },
        Outcome::Done(v) => Finish { status: JobStatus::Done, result: Some(v), ..base },
        Outcome::Error { message, after } if attempt.number < max_attempts => Finish {
            error: Some(text(&message)),
            delay: after.map_or_else(|| policy.backoff_after(attempt.number), |a| a.min(MAX_DELAY)),
            ..base
        },
        Outcome::Error { message, .. } | Outcome::Fail(message) => {
            Finish { status: JobStatus::Failed, error: Some(text(&message)), ..base }
        }
        Outcome::Snooze(after) => Finish { delay: after.min(MAX_DELAY), uncount: true, ..base },
        Outcome::Cancelled => Finish { status: JobStatus::Cancelled, ..base },
        Outcome::Released => Finish { uncount: true, ..base },
        Outcome::LeaseLost => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(number: i32, max_attempts: Option<i32>) -> Attempt {
        Attempt { id: Uuid::new_v4(), queue: "default".into(), number, max_attempts, row: None }
    }

    #[test]
    fn errors_retry_until_attempts_run_out() {
        let p = RetryPolicy { jitter: 0.0, backoff: Duration::from_secs(1), ..RetryPolicy::default() };
        let err = Outcome::Error { message: "boom".into(), after: None };
        let f = finish_for(&job(2, Some(3)), err.clone(), &p).unwrap();
        assert_eq!((f.status, f.delay, f.error.as_deref()), (JobStatus::Pending, Duration::from_secs(2), Some("boom")));
        let f = finish_for(&job(3, Some(3)), err.clone(), &p).unwrap();
        assert_eq!(f.status, JobStatus::Failed);
        // Without a per-job value the queue's default applies.
        let f = finish_for(&job(10, None), err, &p).unwrap();
        assert_eq!(f.status, JobStatus::Failed);
    }

    #[test]
    fn values_postgres_cannot_store_never_reach_it() {
        let p = RetryPolicy::default();
        let f = finish_for(&job(1, Some(1)), Outcome::Done(json!({"a": "x\u{0}"})), &p).unwrap();
        assert_eq!(f.status, JobStatus::Failed);
        assert!(f.result.is_none());
        let f = finish_for(&job(1, Some(1)), Outcome::Fail("bad\u{0}byte".into()), &p).unwrap();
        assert_eq!(f.error.as_deref(), Some("bad\u{FFFD}byte"));
        let f = finish_for(&job(1, Some(1)), Outcome::Snooze(Duration::MAX), &p).unwrap();
        assert_eq!(f.delay, MAX_DELAY);
    }

    #[test]
    fn snooze_and_release_do_not_count() {
        let p = RetryPolicy::default();
        let f = finish_for(&job(1, Some(1)), Outcome::Snooze(Duration::from_secs(5)), &p).unwrap();
        assert_eq!((f.status, f.uncount, f.delay), (JobStatus::Pending, true, Duration::from_secs(5)));
        let f = finish_for(&job(1, Some(1)), Outcome::Released, &p).unwrap();
        assert_eq!((f.status, f.uncount), (JobStatus::Pending, true));
        assert!(finish_for(&job(1, None), Outcome::LeaseLost, &p).is_none());
        let f = finish_for(&job(1, Some(5)), Outcome::Fail("bad input".into()), &p).unwrap();
        assert_eq!(f.status, JobStatus::Failed);
    }
}
