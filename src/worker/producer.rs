//! One producer per queue: it claims as many jobs as the queue has room for (free slots plus the jobs it
//! may claim ahead, see [`super::prefetch`]), in one statement, and starts an executor for each; an
//! executor claimed ahead waits for a slot. The table stays the truth: a job held here is leased and
//! heartbeated, and goes back to pending if the instance stops before running it. When the queue runs dry the producer waits for whichever comes first: a wake-up
//! from the listener, the poll tick, or the moment the earliest scheduled job comes due.

use std::sync::Arc;
use std::time::Duration;

use slog::{debug, warn};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use std::collections::VecDeque;

use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;

use super::executor::{execute, Finished};
use super::outcome::{Attempt, Outcome};
use super::running::Entry;
use super::{QueueRuntime, Shared};
use crate::db::{queries, ConnSlot};
use crate::job::Job;
use crate::supervisor::TaskResult;
use tokio::time::timeout;

/// Largest claim, whatever the concurrency: keeps one statement's lock set and result modest.
const MAX_CLAIM: usize = 1000;

/// While a backlog exists, how long the producer may wait for more free slots after the first one,
/// so that the next claim is a batch rather than a trickle of single-job claims. Only ever spent when
/// the queue is known to have more runnable jobs than free slots.
const FETCH_COOLDOWN: Duration = Duration::from_millis(2);

/// How long the producer may keep claiming after a cursor before it looks at the head of the claim
/// order again: bounds how long a job that sorts first could wait if its wake-up were lost.
const CURSOR_MAX_AGE: Duration = Duration::from_secs(1);

/// Margin added to a scheduled job's due time so that the database's `now()` has passed `run_at` when
/// the claim runs.
const TIMER_MARGIN: Duration = Duration::from_millis(3);

/// Runs until shutdown. Returns the executors it started (still running, for the engine to wait for)
/// and, if an executor panicked, the failure. (Handlers' panics are caught inside the executor; an
/// executor's own panic is a bug that must bring the instance down, not leak a slot.)
pub(crate) async fn run(
    queue: Arc<QueueRuntime>,
    shared: Arc<Shared>,
    done: mpsc::Sender<Finished>,
    shutdown: CancellationToken,
) -> (JoinSet<()>, TaskResult) {
    let mut executors = JoinSet::new();
    let result = claim_loop(&queue, &shared, &done, &shutdown, &mut executors).await;
    (executors, result)
}

async fn claim_loop(
    queue: &Arc<QueueRuntime>,
    shared: &Arc<Shared>,
    done: &mpsc::Sender<Finished>,
    shutdown: &CancellationToken,
    executors: &mut JoinSet<()>,
) -> TaskResult {
    let log = shared.log.new(slog::o!("component" => "producer", "queue" => queue.config.name.clone()));
    let mut conn = ConnSlot::for_claims(&shared.connector, &log);
    let mut backoff = Duration::from_millis(100);
    let mut backlog = false;
    let half = (queue.capacity().min(MAX_CLAIM) / 2) as u32;
    // Where the last full claim ended, while a backlog is worked through (see `JOB_CLAIM_AFTER`), and
    // since when: the head of the claim order is looked at again at least every CURSOR_MAX_AGE.
    let mut cursor: Option<(queries::ClaimCursor, Instant)> = None;
    let mut urgent_full = false;
    loop {
        // Wait for a free slot.
        // Shutdown first: once it began, a free slot must not lead to another claim.
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            p = queue.room.clone().acquire_owned() => p.map_err(|_| "room semaphore closed".to_string())?,
        };
        // Reap executors that have ended; one that panicked is a bug in this crate.
        while let Some(ended) = executors.try_join_next() {
            if let Err(e) = ended {
                if e.is_panic() {
                    return Err(format!("executor {}", crate::supervisor::panic_text(e.into_panic())));
                }
            }
        }
        if backlog && half > 1 {
            // Measured with no-op jobs and concurrency 1000: without this, claims shrank to a few
            // jobs each as slots freed one by one.
            let more = tokio::time::timeout(FETCH_COOLDOWN, queue.room.clone().acquire_many_owned(half - 1)).await;
            drop(more);
        }
        let want = (1 + queue.room.available_permits()).min(MAX_CLAIM);
        // A wake-up means something may sort before the cursor (an urgent insert, a retry, released
        // jobs). While a backlog is worked after a cursor, the answer is a claim of what is more urgent
        // than the cursor, a bounded range, and the backlog goes on after it; jobs of the cursor's
        // priority that sort before it wait for the claim from the head that comes at least every
        // CURSOR_MAX_AGE. Consuming the stored permit here is fine; this claim is the answer to it.
        // A full claim of more urgent jobs may have left more of them: ask again before the backlog.
        let woken = queue.wake.notified().now_or_never().is_some() || urgent_full;
        if cursor.is_some_and(|(_, at)| at.elapsed() > CURSOR_MAX_AGE) {
            cursor = None;
        }
        let after = if backlog { cursor.map(|(c, _)| c) } else { None };
        let from = match after {
            Some(c) if woken => queries::ClaimFrom::MoreUrgentThan(c.0),
            Some(c) => queries::ClaimFrom::After(c),
            None => queries::ClaimFrom::Head,
        };
        let urgent_only = matches!(from, queries::ClaimFrom::MoreUrgentThan(_));

        // A wake-up that arrives while the claim is in flight is not lost: `notify_one` stores a
        // permit when the producer is not waiting, and the next `notified()` returns at once.
        let (name, limit, instance) = (&queue.config.name, want as i64, &shared.instance_id);
        let (lease, max_attempts) = (shared.lease, queue.config.retry.max_attempts);
        let claim = timeout(conn.deadline(), async {
            queries::job_claim(conn.get().await?, name, limit, instance, lease, max_attempts, from).await
        })
        .await;
        let claimed = match conn.settle(claim) {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                drop(first);
                warn!(log, "claim failed; backing off"; "err" => %e, "backoff_ms" => backoff.as_millis() as u64);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };

        let n = claimed.jobs.len();
        if urgent_only {
            // The cursor stays: the backlog after it is next.
        } else if n == want {
            let last = claimed.jobs.iter().map(|j| (j.priority, j.run_at, j.id)).max().expect("a full claim has jobs");
            cursor = Some((last, cursor.map_or_else(Instant::now, |(_, at)| at)));
        } else {
            cursor = None;
        }
        let mut first = Some(first);
        let now = chrono::Utc::now();
        // Every claimed job is held from here on: registered at once, so that heartbeats extend the
        // lease of those still waiting for a slot and a cancel reaches them.
        let mut ahead = VecDeque::with_capacity(n);
        for job in claimed.jobs {
            crate::metrics::job_claimed(&job.queue, (now - job.run_at).as_seconds_f64());
            let room = match first.take() {
                Some(p) => p,
                // Only this task takes permits, and `want` did not exceed what was free.
                None => queue.room.clone().try_acquire_owned().expect("claimed no more jobs than there was room for"),
            };
            debug!(log, "claimed"; "job_id" => %job.id, "attempt" => job.attempts);
            let entry = shared.running.insert(job.id, job.attempts);
            ahead.push_back((job, entry, room));
        }
        drop(first);
        // Started in the order claimed (priority, then run_at), each as soon as a slot is free. The
        // producer does the waiting rather than each executor, so that the order holds.
        while let Some((job, entry, room)) = ahead.pop_front() {
            let slot = match queue.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        ahead.push_front((job, entry, room));
                        release(ahead, done).await;
                        return Ok(());
                    }
                    slot = queue.slots.clone().acquire_owned() => slot.map_err(|_| "slot semaphore closed".to_string())?,
                },
            };
            executors.spawn(execute(job, entry, slot, room, queue.clone(), shared.clone(), done.clone()));
        }
        if urgent_only {
            // However many came back, the backlog after the cursor is still there.
            urgent_full = n == want;
            backlog = true;
            continue;
        }
        urgent_full = false;
        backlog = n == want;
        if !backlog && after.is_some() {
            // Nothing more after the cursor; what sorts before it (if anything) is for a claim from
            // the head, at once rather than after the poll interval.
            backlog = true;
            continue;
        }
        if backlog {
            // There may be more: claim again as soon as slots are free.
            continue;
        }

        let due = claimed.next_due_in.map(|d| Instant::now() + d + TIMER_MARGIN);
        let poll = shared.poll_interval.mul_f64(0.9 + fastrand::f64() * 0.2);
        tokio::select! {
            _ = queue.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = sleep_until_opt(due) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Gives jobs claimed ahead back at shutdown: they go to the completer as released (back to pending,
/// the attempt not counted), without their handlers ever starting.
async fn release(ahead: VecDeque<(Job, Entry, OwnedSemaphorePermit)>, done: &mpsc::Sender<Finished>) {
    for (job, _entry, room) in ahead {
        let finished =
            Finished { attempt: Attempt::of(&job), outcome: Outcome::Released, started: std::time::Instant::now() };
        // The completer outlives every producer; a failed send means the process is exiting.
        let _ = done.send(finished).await;
        drop(room);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
