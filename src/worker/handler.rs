//! The library API for job code: a [`Handler`] per queue, given a [`JobContext`], answering with a
//! result or a [`HandlerError`] that says what to do next.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::job::Job;

/// What a handler returns: the job's `result` on success.
pub type HandlerResult = Result<Value, HandlerError>;

pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// Job code for one queue. Any `Fn(JobContext) -> impl Future<Output = HandlerResult>` is a handler:
///
/// ```no_run
/// # use jobqueue::{JobContext, HandlerError};
/// let send_email = |ctx: JobContext| async move {
///     let to = ctx.job.payload["to"].as_str().ok_or_else(|| HandlerError::fail("no recipient"))?;
///     Ok::<_, HandlerError>(serde_json::json!({ "sent_to": to }))
/// };
/// ```
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, ctx: JobContext) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        Box::pin(self(ctx))
    }
}

/// The job being run, and its cancellation signal.
pub struct JobContext {
    /// The job as claimed: `attempts` already counts this attempt.
    pub job: Job,
    cancel: CancellationToken,
}

impl JobContext {
    pub(crate) fn new(job: Job, cancel: CancellationToken) -> Self {
        JobContext { job, cancel }
    }

    /// Resolves when the job is cancelled (`POST /jobs/{id}/cancel`, on any instance) or its lease was
    /// lost. The worker then drops the handler's future at its next `.await`; watch this to stop
    /// cleanly first, e.g. in a `tokio::select!` around a long step.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A clone of the token, for handlers that spawn work of their own.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// A failed attempt, and what to do about it.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum HandlerError {
    /// Try again after the queue's backoff (or `after`, if given) while attempts remain, else fail.
    #[error("{message}")]
    Retry { message: String, after: Option<Duration> },
    /// Fail now; no further attempts.
    #[error("{message}")]
    Fail { message: String },
    /// Not a failure: run again after `after`, without counting this attempt.
    #[error("snoozed for {after:?}")]
    Snooze { after: Duration },
}

impl HandlerError {
    pub fn retry(message: impl std::fmt::Display) -> Self {
        HandlerError::Retry { message: message.to_string(), after: None }
    }

    pub fn retry_after(message: impl std::fmt::Display, after: Duration) -> Self {
        HandlerError::Retry { message: message.to_string(), after: Some(after) }
    }

    pub fn fail(message: impl std::fmt::Display) -> Self {
        HandlerError::Fail { message: message.to_string() }
    }

    pub fn snooze(after: Duration) -> Self {
        HandlerError::Snooze { after }
    }
}

/// The handler the `jobqueue` binary registers for every queue it serves: what the original service
/// did, marking the job done with the result "Job processed successfully".
pub fn default_handler() -> impl Handler {
    |_ctx: JobContext| async { Ok(Value::String("Job processed successfully".into())) }
}
