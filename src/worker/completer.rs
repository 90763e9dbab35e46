//! Writes finished attempts in batches: whatever has arrived while the previous write was in flight
//! goes out in the next single statement. Under load that is hundreds of jobs per round trip; when
//! idle it is one job with no added delay.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{debug, error, info, warn, Logger};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::executor::Finished;
use super::outcome::{finish_for, Attempt, Outcome};
use super::Shared;
use crate::db::queries::{self, Finish};
use crate::db::{ConnSlot, ErrorClass};
use crate::job::{JobStatus, RetryPolicy};
use crate::waiters::Waiters;
use tokio::time::timeout;

/// Largest number of outcomes written by one statement.
const MAX_BATCH: usize = 2000;

pub(crate) struct Completer {
    pub shared: Arc<Shared>,
    pub policies: HashMap<String, RetryPolicy>,
    pub wakes: HashMap<String, Arc<Notify>>,
    pub waiters: Arc<Waiters>,
    /// Cancelled when shutdown has waited long enough: stop retrying a write that keeps failing (the
    /// leases will expire and the rescuer will return those jobs).
    pub give_up: CancellationToken,
}

impl Completer {
    pub async fn run(self, mut rx: mpsc::Receiver<Finished>) {
        let log = self.shared.log.new(slog::o!("component" => "completer"));
        let mut conn = ConnSlot::new(&self.shared.connector, &log);
        self.warm_up(&mut conn, &log).await;
        let mut released = 0usize;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            // At most a channel's worth: executors refill the channel while this drains it, and an
            // unbounded batch would let that many more jobs stand processing (see the engine).
            let most = MAX_BATCH.min(rx.max_capacity());
            while batch.len() < most {
                match rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            released += self.write(&mut conn, batch, &log).await;
        }
        if released > 0 {
            info!(log, "released unfinished jobs back to pending"; "count" => released);
        }
    }

    /// Opens the connection and finishes a job that is then rolled back, before any real job is done:
    /// the first execution on a new connection (connecting, preparing, routing rows into
    /// `jobs_finished`, planning `jobqueue_release_dependants`) took 8 to 14 ms, which the first batch
    /// of a drain paid while the whole room waited for it. (A warm-up on an empty batch, as before,
    /// left the routing and the function's plan cold.) A failure here is only logged; the first real
    /// write retries anyway.
    async fn warm_up(&self, conn: &mut ConnSlot, log: &Logger) {
        let instance = &self.shared.instance_id;
        let warm =
            timeout(conn.deadline(), async { queries::job_finish_warm_up(conn.get().await?, instance).await }).await;
        if let Err(e) = conn.settle(warm) {
            debug!(log, "could not warm up the completer's connection"; "err" => %e);
        }
    }

    /// Writes one batch; returns how many jobs it released back to pending (shutdown).
    async fn write(&self, conn: &mut ConnSlot, batch: Vec<Finished>, log: &Logger) -> usize {
        let default_policy = RetryPolicy::default();
        // Every attempt of the batch leaves the running set once this write is over, written or not.
        let ended: Vec<(Uuid, i32)> = batch.iter().map(|f| (f.attempt.id, f.attempt.number)).collect();
        // The rows to write, and beside each what the log and the wake-ups need afterwards.
        let mut finishes: Vec<Finish> = Vec::with_capacity(batch.len());
        let mut about: Vec<(Attempt, Instant, bool, bool)> = Vec::with_capacity(batch.len());
        for f in batch {
            let released = f.outcome == Outcome::Released;
            let snoozed = matches!(f.outcome, Outcome::Snooze(_));
            let policy = self.policies.get(&f.attempt.queue).unwrap_or(&default_policy);
            match finish_for(&f.attempt, f.outcome, policy) {
                Some(w) => {
                    finishes.push(w);
                    about.push((f.attempt, f.started, released, snoozed));
                }
                None => {
                    crate::metrics::attempt_finished(&f.attempt.queue, "lost", f.started.elapsed().as_secs_f64());
                    warn!(log, "lease lost while the handler ran; result dropped";
                          "job_id" => %f.attempt.id, "queue" => &f.attempt.queue, "attempt" => f.attempt.number)
                }
            }
        }

        let mut backoff = Duration::from_millis(50);
        // What has been written so far. A try may fail after committing part of the batch (its first
        // statement); the next try writes only what is left.
        let mut written: HashMap<Uuid, JobStatus> = HashMap::new();
        let mut left: Option<Vec<Finish>> = None;
        loop {
            let batch = left.as_deref().unwrap_or(&finishes);
            if batch.is_empty() {
                break;
            }
            let instance = &self.shared.instance_id;
            let mut got = Vec::new();
            let attempt = timeout(conn.deadline(), async {
                queries::job_finish_batch_into(conn.get().await?, instance, batch, &mut got).await
            })
            .await;
            written.extend(got);
            match conn.settle(attempt) {
                Ok(()) => break,
                Err(e) if !e.is_retryable() => {
                    // The database refused a value, or our statement or a row's decoding is wrong:
                    // retrying the same batch cannot help. One bad outcome must not hold back the
                    // rest, so write them one at a time; whatever still fails is left to its lease
                    // and the rescuer, never retried forever.
                    if e.class() == ErrorClass::Bug {
                        error!(log, "bug: writing finished jobs failed; writing them one by one"; "err" => %e);
                    } else {
                        warn!(log, "batch of finished jobs refused; writing them one by one"; "err" => %e);
                    }
                    let ones: Vec<&Finish> = batch.iter().filter(|f| !written.contains_key(&f.id)).collect();
                    for f in ones {
                        let one = timeout(conn.deadline(), async {
                            queries::job_finish_batch(conn.get().await?, instance, std::slice::from_ref(f)).await
                        })
                        .await;
                        match conn.settle(one) {
                            Ok(r) => written.extend(r),
                            Err(e) => error!(log, "could not record a finished job; its lease will expire";
                                             "job_id" => %f.id, "attempt" => f.attempt, "err" => %e),
                        }
                    }
                    break;
                }
                Err(e) => {
                    // Unavailable (retry with backoff) or transient (a lost race: the next try wins).
                    warn!(log, "could not record finished jobs; retrying"; "count" => finishes.len(), "err" => %e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.give_up.cancelled() => {
                            warn!(log, "gave up recording finished jobs; their leases will expire";
                                  "count" => finishes.len());
                            self.shared.running.remove(ended);
                            return 0;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    left = Some(finishes.iter().filter(|f| !written.contains_key(&f.id)).cloned().collect());
                }
            }
        }

        let mut to_wake = BTreeSet::new();
        let mut finished_ids = Vec::new();
        let mut released_queues = BTreeSet::new();
        let mut released = 0;
        for (w, (a, started, was_released, snoozed)) in finishes.iter().zip(about) {
            let elapsed = started.elapsed();
            let ms = elapsed.as_millis() as u64;
            let Some(status) = written.get(&w.id).copied() else {
                crate::metrics::attempt_finished(&a.queue, "lost", elapsed.as_secs_f64());
                warn!(log, "lease lost before the outcome was written; result dropped";
                      "job_id" => %w.id, "queue" => &a.queue, "attempt" => a.number, "duration_ms" => ms);
                continue;
            };
            let was_released = was_released && status == JobStatus::Pending;
            let outcome = match status {
                JobStatus::Pending if was_released => "released",
                JobStatus::Pending if snoozed => "snoozed",
                JobStatus::Done => "done",
                JobStatus::Failed => "failed",
                JobStatus::Cancelled => "cancelled",
                // Pending again after an error (or, rarely, processing: another write won).
                _ => "retry",
            };
            crate::metrics::attempt_finished(&a.queue, outcome, elapsed.as_secs_f64());
            // Success is the normal case and can run to tens of thousands a second: at debug, so that
            // the default log stays readable and cheap (at info, logging cost a single instance more
            // than half of its drain rate). Everything else an operator may need to act on is info.
            let shown = if was_released { "released" } else { status.as_str() };
            let err = w.error.as_deref().unwrap_or("");
            if matches!(outcome, "done" | "snoozed") {
                debug!(log, "job finished"; "job_id" => %w.id, "queue" => &a.queue, "attempt" => a.number,
                       "status" => shown, "duration_ms" => ms, "err" => err);
            } else {
                info!(log, "job finished"; "job_id" => %w.id, "queue" => &a.queue, "attempt" => a.number,
                      "status" => shown, "duration_ms" => ms, "err" => err);
            }
            if status.is_finished() {
                finished_ids.push(w.id);
            } else if was_released {
                released += 1;
                released_queues.insert(a.queue);
            } else {
                // A retry or snooze: the producer re-arms its timer for the new run_at.
                to_wake.insert(a.queue);
            }
        }
        self.shared.running.remove(ended);
        self.waiters.finished(&finished_ids);
        for q in &to_wake {
            if let Some(w) = self.wakes.get(q) {
                w.notify_one();
            }
        }
        if !released_queues.is_empty() {
            // Other instances may pick these up straight away.
            let queues: Vec<String> = released_queues.into_iter().collect();
            if let Ok(c) = conn.get().await {
                if let Err(e) = queries::queue_notify(c.client(), &queues).await {
                    warn!(log, "could not announce released jobs"; "err" => %e);
                }
            }
        }
        released
    }
}
