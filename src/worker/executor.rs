//! Runs one claimed job: the handler under a timeout, with panics caught and cancellation observed,
//! then hands the outcome to the completer. Holds no transaction and no row lock while it runs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::handler::{HandlerError, JobContext};
use super::outcome::{Attempt, Outcome};
use super::running::{Entry, StopReason};
use super::{QueueRuntime, Shared};
use crate::job::Job;

/// How long a cancelled handler may keep running to finish on its own before it is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// One finished attempt on its way to the completer.
pub(crate) struct Finished {
    pub attempt: Attempt,
    pub outcome: Outcome,
    pub started: Instant,
}

/// Runs `job` in `slot`. `entry` registered the attempt at its claim; `room` is the job's place among
/// those the queue holds, given back once the outcome is handed over.
pub(crate) async fn execute(
    job: Job,
    entry: Entry,
    slot: OwnedSemaphorePermit,
    room: OwnedSemaphorePermit,
    queue: Arc<QueueRuntime>,
    shared: Arc<Shared>,
    done: mpsc::Sender<Finished>,
) {
    let started = Instant::now();
    let attempt = Attempt::of(&job, entry.row);
    if entry.token.is_cancelled() {
        // Cancelled (or found lost) while it waited for its slot: it never runs.
        let outcome = match entry.reason.get() {
            Some(StopReason::LeaseLost) => Outcome::LeaseLost,
            _ => Outcome::Cancelled,
        };
        drop(slot);
        let _ = done.send(Finished { attempt, outcome, started }).await;
        drop(room);
        return;
    }
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
                queue.handler_time.record(started.elapsed());
                outcome
            }
        }
    };
    // The slot goes back as soon as the handler is done, so a job claimed ahead starts at once; the
    // room goes back once the outcome is handed to the completer. The channel is bounded: when the
    // completer falls behind, executors wait here holding their room, and the producer stops claiming.
    // (With an unbounded channel a slow completer let claims run ahead: 84,000 jobs stood processing
    // at concurrency 1000, their outcomes queued in memory.) The completer only goes away after every
    // sender has; a failed send means the process is exiting.
    drop(slot);
    let _ = done.send(Finished { attempt, outcome, started }).await;
    drop(room);
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    format!("handler {}", crate::supervisor::panic_text(panic))
}
