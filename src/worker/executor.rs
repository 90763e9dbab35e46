//! Runs one claimed job: the handler under a timeout, with panics caught and cancellation observed,
//! then hands the outcome to the completer. Holds no transaction and no row lock while it runs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use uuid::Uuid;

use super::handler::{HandlerError, JobContext};
use super::running::StopReason;
use super::{QueueRuntime, Shared};
use crate::db::queries::Finish;
use crate::job::{Job, JobStatus, RetryPolicy, MAX_DELAY};

/// How long a cancelled handler may keep running to finish on its own before it is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

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
}

impl Attempt {
    fn of(job: &Job) -> Attempt {
        Attempt { id: job.id, queue: job.queue.clone(), number: job.attempts, max_attempts: job.max_attempts }
    }
}

/// One finished attempt on its way to the completer.
pub(crate) struct Finished {
    pub attempt: Attempt,
    pub outcome: Outcome,
    pub started: Instant,
}

pub(crate) async fn execute(
    job: Job,
    permit: OwnedSemaphorePermit,
    queue: Arc<QueueRuntime>,
    shared: Arc<Shared>,
    done: mpsc::Sender<Finished>,
) {
    let started = Instant::now();
    let attempt = Attempt::of(&job);
    let entry = shared.running.insert(attempt.id, attempt.number);
    let ctx = JobContext::new(job, entry.token.clone());
    let outcome = {
        // Creating the future may itself panic; so may polling it.
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| queue.handler.handle(ctx)));
        match run {
            Err(panic) => Outcome::Error { message: panic_message(panic), after: None },
            Ok(fut) => {
                let timeout = queue.config.timeout.unwrap_or(shared.job_timeout);
                let guarded = tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind());
                let mut guarded = std::pin::pin!(guarded);
                // A requested cancellation wins over the shutdown's release.
                let outcome = tokio::select! {
                    biased;
                    _ = entry.token.cancelled() => {
                        // A handler watching `ctx.cancelled()` gets a moment to stop on its own terms
                        // (clean up, return) before its future is dropped.
                        let _ = tokio::time::timeout(CANCEL_GRACE, &mut guarded).await;
                        match entry.reason.get() {
                            Some(StopReason::LeaseLost) => Outcome::LeaseLost,
                            _ => Outcome::Cancelled,
                        }
                    }
                    _ = shared.hard_stop.cancelled() => Outcome::Released,
                    r = &mut guarded => match r {
                        Err(_) => Outcome::Error {
                            message: format!("handler timed out after {}", humantime::format_duration(timeout)),
                            after: None,
                        },
                        Ok(Err(panic)) => Outcome::Error { message: panic_message(panic), after: None },
                        Ok(Ok(Ok(v))) => Outcome::Done(v),
                        Ok(Ok(Err(HandlerError::Retry { message, after }))) => Outcome::Error { message, after },
                        Ok(Ok(Err(HandlerError::Fail { message }))) => Outcome::Fail(message),
                        Ok(Ok(Err(HandlerError::Snooze { after }))) => Outcome::Snooze(after),
                    },
                };
                // Whatever ended the attempt (timeout, shutdown), work the handler spawned with the
                // token stops too.
                entry.token.cancel();
                outcome
            }
        }
    };
    // The slot goes back once the outcome is handed to the completer, not when it is written, so the
    // producer can claim the next job while the completer batches this one. The channel is bounded:
    // when the completer falls behind, executors wait here holding their slots, and the producer stops
    // claiming. (With an unbounded channel a slow completer let claims run ahead: 84,000 jobs stood
    // processing at concurrency 1000, their outcomes queued in memory.)
    // The completer only goes away after every sender has; a failed send means the process is exiting.
    let _ = done.send(Finished { attempt, outcome, started }).await;
    drop(permit);
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    format!("handler {}", crate::supervisor::panic_text(panic))
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
        Attempt { id: Uuid::new_v4(), queue: "default".into(), number, max_attempts }
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
