//! One producer per queue: it claims as many jobs as the queue has room for (free slots plus the jobs it
//! may claim ahead, see [`super::prefetch`]), in one statement, and starts an executor for each as
//! slots free. The table stays the truth: a job held here is leased and heartbeated, and goes back to
//! pending if the instance stops before running it. When the queue runs dry the producer waits for
//! whichever comes first: a wake-up from the listener, the poll tick, or the moment the earliest
//! scheduled job comes due.
//!
//! The next claim runs while the jobs of the previous ones wait for slots, and the jobs claimed ahead
//! start most urgent first (priority, then run_at, then id) across claims, not in the order they were
//! claimed: an urgent job that a later claim brings starts at the next free slot, whatever was
//! claimed before it. That is what lets claims be large without delaying urgent jobs.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use slog::{debug, warn, Logger};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::executor::{execute, Finished};
use super::outcome::{Attempt, Outcome};
use super::prefetch::{self, Parked};
use super::running::Entry;
use super::{QueueRuntime, Shared};
use crate::db::{queries, ConnSlot, DbError, Purpose, RowAddress};
use crate::job::Job;
use crate::supervisor::TaskResult;

/// Largest claim, whatever the concurrency: keeps one statement's lock set and result modest.
const MAX_CLAIM: usize = 1000;

/// While a backlog exists, how long a claim may wait for more room after the first free place, so that
/// it is a batch rather than a trickle of single-job claims. Only ever spent when the queue is known to
/// have more runnable jobs than room, and it no longer holds up the start of jobs already claimed.
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
    let log = shared.log.new(slog::o!("component" => "producer", "queue" => queue.config.name.clone()));
    let mut producer = Producer {
        conn: Some(ConnSlot::with_purpose(&shared.connector, Purpose::Claim, &log)),
        parked: Parked::new(queue.room.clone()),
        queue,
        shared,
        done,
        shutdown,
        log,
        executors: JoinSet::new(),
        ahead: BinaryHeap::new(),
        plan: Plan { backlog: false, cursor: None, urgent_full: false },
        backoff: Duration::from_millis(100),
    };
    let result = producer.claim_loop().await;
    (producer.executors, result)
}

/// A claim in flight: it gives back the connection and, unless shutdown came before its statement, the
/// answer and what it asked for.
type InFlight = Pin<Box<dyn Future<Output = (ConnSlot, Option<ClaimDone>)> + Send>>;

struct ClaimDone {
    from: queries::ClaimFrom,
    want: usize,
    /// The first place, held since before the statement; the others are taken per job from `places`,
    /// the queue's room or its urgent reserve.
    first: OwnedSemaphorePermit,
    places: Arc<Semaphore>,
    result: Result<queries::Claimed, DbError>,
}

/// When the next claim may start.
#[derive(Clone, Copy)]
enum Wait {
    /// As soon as there is room.
    No,
    /// After a wake-up, or at this instant (the poll tick or the next scheduled job, whichever is first).
    Idle(Instant),
    /// At this instant, after a failed claim: wake-ups do not cut a backoff short.
    Backoff(Instant),
}

/// What the next claim should be, from what the previous ones found.
#[derive(Clone, Copy)]
struct Plan {
    /// The last claim came back full: there is more to claim as soon as there is room.
    backlog: bool,
    /// Where the last full claim ended while a backlog is worked through (see `JOB_CLAIM_AFTER`), and
    /// since when: the head of the claim order is looked at again at least every CURSOR_MAX_AGE.
    cursor: Option<(queries::ClaimCursor, Instant)>,
    /// A claim of more urgent jobs came back full: ask again before the backlog.
    urgent_full: bool,
}

/// A job claimed ahead of a free slot, ordered most urgent first.
struct Ahead {
    job: Job,
    entry: Entry,
    room: OwnedSemaphorePermit,
}

/// A job's position in the claim order: the order claims take and jobs claimed ahead start in.
fn claim_order(job: &Job) -> queries::ClaimCursor {
    (job.priority, job.run_at, job.id)
}

impl Ahead {
    fn key(&self) -> queries::ClaimCursor {
        claim_order(&self.job)
    }
}

impl PartialEq for Ahead {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Ahead {}

impl PartialOrd for Ahead {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ahead {
    /// Reversed: `BinaryHeap` pops its greatest element, and the most urgent job must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

struct Producer {
    /// The claim connection, away while a claim is in flight.
    conn: Option<ConnSlot>,
    queue: Arc<QueueRuntime>,
    shared: Arc<Shared>,
    done: mpsc::Sender<Finished>,
    shutdown: CancellationToken,
    log: Logger,
    executors: JoinSet<()>,
    ahead: BinaryHeap<Ahead>,
    /// Places of the room kept out of use while the handlers are too slow to call for them.
    parked: Parked,
    plan: Plan,
    backoff: Duration,
}

impl Producer {
    async fn claim_loop(&mut self) -> TaskResult {
        let mut in_flight: Option<InFlight> = None;
        // Claim at once on start-up: jobs may be waiting.
        let mut wait = Wait::No;
        loop {
            self.reap()?;
            // Start what can start.
            while !self.ahead.is_empty() {
                match self.queue.slots.clone().try_acquire_owned() {
                    Ok(slot) => self.start(slot),
                    Err(_) => break,
                }
            }
            if in_flight.is_none() && matches!(wait, Wait::No) && !self.shutdown.is_cancelled() {
                // Between claims only: a claim in flight counts on the places it saw.
                let c = self.queue.config.concurrency;
                self.parked.set(prefetch::most(c) - prefetch::wanted(c, self.queue.handler_time.mean()));
                let conn = self.conn.take().expect("the connection is home between claims");
                in_flight = Some(self.claim(conn));
            }
            let (woken_ends_wait, until) = match wait {
                Wait::No => (false, None),
                Wait::Idle(until) => (true, Some(until)),
                Wait::Backoff(until) => (false, Some(until)),
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    // A claim whose statement was sent is waited for (bounded by the statement
                    // deadline), so that what it claimed is released rather than left to its lease.
                    if let Some(claim) = in_flight.take() {
                        if let (_, Some(ClaimDone { result: Ok(claimed), first, places, .. })) = claim.await {
                            self.hold(claimed.jobs, claimed.rows, first, &places);
                        }
                    }
                    release(std::mem::take(&mut self.ahead), &self.done).await;
                    return Ok(());
                }
                (conn, done) = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    self.conn = Some(conn);
                    if let Some(done) = done {
                        wait = self.claimed(done);
                    }
                }
                slot = self.queue.slots.clone().acquire_owned(), if !self.ahead.is_empty() => {
                    self.start(slot.map_err(|_| "slot semaphore closed".to_string())?);
                }
                _ = self.queue.wake.notified(), if woken_ends_wait => wait = Wait::No,
                _ = sleep_until_opt(until), if until.is_some() => wait = Wait::No,
            }
        }
    }

    /// Takes in what a claim brought and decides when to claim next.
    fn claimed(&mut self, done: ClaimDone) -> Wait {
        match done.result {
            Ok(claimed) => {
                self.backoff = Duration::from_millis(100);
                let idle = self.replan(done.from, done.want, &claimed.jobs);
                let next_due = claimed.next_due_in;
                self.hold(claimed.jobs, claimed.rows, done.first, &done.places);
                if !idle {
                    return Wait::No;
                }
                let poll = Instant::now() + self.shared.poll_interval.mul_f64(0.9 + fastrand::f64() * 0.2);
                let due = next_due.map(|d| Instant::now() + d + TIMER_MARGIN);
                Wait::Idle(due.map_or(poll, |d| d.min(poll)))
            }
            Err(e) => {
                drop(done.first);
                warn!(self.log, "claim failed; backing off"; "err" => %e, "backoff_ms" => self.backoff.as_millis() as u64);
                self.plan.backlog = false;
                let until = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                Wait::Backoff(until)
            }
        }
    }

    /// Reaps executors that have ended; one that panicked is a bug in this crate.
    fn reap(&mut self) -> TaskResult {
        while let Some(ended) = self.executors.try_join_next() {
            if let Err(e) = ended {
                if e.is_panic() {
                    return Err(format!("executor {}", crate::supervisor::panic_text(e.into_panic())));
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, slot: OwnedSemaphorePermit) {
        let Ahead { job, entry, room } = self.ahead.pop().expect("a job to start");
        let (queue, shared, done) = (self.queue.clone(), self.shared.clone(), self.done.clone());
        self.executors.spawn(execute(job, entry, slot, room, queue, shared, done));
    }

    /// Every claimed job is held from here on: registered at once, so that heartbeats extend the lease
    /// of those still waiting for a slot and a cancel reaches them.
    fn hold(&mut self, jobs: Vec<Job>, rows: Vec<RowAddress>, first: OwnedSemaphorePermit, places: &Arc<Semaphore>) {
        let now = chrono::Utc::now();
        let mut first = Some(first);
        let mut rows = rows.into_iter();
        for job in jobs {
            crate::metrics::job_claimed(&job.queue, (now - job.run_at).as_seconds_f64());
            let room = match first.take() {
                Some(p) => p,
                // Only the claim takes places, and it asked for no more than there were: they only
                // grew while its statement ran.
                None => places.clone().try_acquire_owned().expect("claimed no more jobs than there were places for"),
            };
            debug!(self.log, "claimed"; "job_id" => %job.id, "attempt" => job.attempts);
            let entry = self.shared.running.insert(job.id, job.attempts, rows.next());
            self.ahead.push(Ahead { job, entry, room });
        }
    }

    /// Starts a claim: it waits for room (and, in a backlog, briefly for more room), then runs the
    /// statement. The answer to a wake-up during a backlog takes its places from the urgent reserve
    /// instead, if it has any, without waiting. Gives no answer if shutdown came first.
    fn claim(&self, mut conn: ConnSlot) -> InFlight {
        let (queue, shared, shutdown, plan) =
            (self.queue.clone(), self.shared.clone(), self.shutdown.clone(), self.plan);
        let in_use = queue.room_size() - self.parked.len();
        Box::pin(async move {
            // Whether a wake-up would be answered by a claim of the more urgent jobs only.
            let urgent = matches!(plan.from(true), queries::ClaimFrom::MoreUrgentThan(_));
            let mut woken = queue.wake.notified().now_or_never().is_some();
            let (first, places) = loop {
                if urgent && (woken || plan.urgent_full) {
                    if let Ok(p) = queue.reserve.clone().try_acquire_owned() {
                        break (p, queue.reserve.clone());
                    }
                }
                // Shutdown first: once it began, free room must not lead to another claim.
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return (conn, None),
                    p = queue.room.clone().acquire_owned() => match p {
                        Ok(p) => break (p, queue.room.clone()),
                        Err(_) => return (conn, None),
                    },
                    _ = queue.wake.notified(), if urgent && !woken => woken = true,
                }
            };
            // A wake-up now asks for whatever is more urgent than the backlog: no wait for more room.
            woken = woken || queue.wake.notified().now_or_never().is_some();
            let half = (in_use.min(MAX_CLAIM) / 2) as u32;
            if Arc::ptr_eq(&places, &queue.room) && plan.backlog && half > 1 && !woken && !plan.urgent_full {
                // Measured with no-op jobs and concurrency 1000: without this, claims shrank to a few
                // jobs each as slots freed one by one.
                tokio::select! {
                    _ = shutdown.cancelled() => return (conn, None),
                    _ = timeout(FETCH_COOLDOWN, queue.room.acquire_many(half - 1)) => {}
                }
            }
            let want = (1 + places.available_permits()).min(MAX_CLAIM);
            let from = plan.from(woken || queue.wake.notified().now_or_never().is_some());
            // A wake-up that arrives while the claim is in flight is not lost: `notify_one` stores a
            // permit when the producer is not waiting, and the next `notified()` returns at once.
            let (name, instance) = (&queue.config.name, &shared.instance_id);
            let (lease, max_attempts) = (shared.lease, queue.config.retry.max_attempts);
            let claim = timeout(conn.deadline(), async {
                queries::job_claim(conn.get().await?, name, want as i64, instance, lease, max_attempts, from).await
            })
            .await;
            let result = conn.settle(claim);
            (conn, Some(ClaimDone { from, want, first, places, result }))
        })
    }

    /// Decides the next claim from what this one found. Returns whether the producer should now wait
    /// (wake-up, poll tick, next due job) rather than claim again as soon as there is room.
    fn replan(&mut self, from: queries::ClaimFrom, want: usize, jobs: &[Job]) -> bool {
        let full = jobs.len() == want;
        let plan = &mut self.plan;
        if let queries::ClaimFrom::MoreUrgentThan(_) = from {
            // However many came back, the backlog after the cursor is still there.
            plan.urgent_full = full;
            plan.backlog = true;
            return false;
        }
        plan.urgent_full = false;
        if full {
            let last = jobs.iter().map(claim_order).max().expect("a full claim has jobs");
            // A claim from the head starts the cursor's age again; one after the cursor keeps it.
            let since = match (from, plan.cursor) {
                (queries::ClaimFrom::After(_), Some((_, at))) => at,
                _ => Instant::now(),
            };
            plan.cursor = Some((last, since));
        } else {
            plan.cursor = None;
        }
        plan.backlog = full;
        if !full && matches!(from, queries::ClaimFrom::After(_)) {
            // Nothing more after the cursor; what sorts before it (if anything) is for a claim from
            // the head, at once rather than after the poll interval.
            plan.backlog = true;
        }
        !plan.backlog
    }
}

impl Plan {
    /// Where the next claim starts. A wake-up means something may sort before the cursor (an urgent
    /// insert, a retry, released jobs). While a backlog is worked after a cursor, the answer is a claim
    /// of what is more urgent than the cursor, a bounded range, and the backlog goes on after it; jobs
    /// of the cursor's priority that sort before it wait for the claim from the head that comes at
    /// least every CURSOR_MAX_AGE. Consuming the stored wake-up is fine; this claim is the answer to it.
    fn from(self, woken: bool) -> queries::ClaimFrom {
        let cursor = self.cursor.filter(|(_, at)| at.elapsed() <= CURSOR_MAX_AGE);
        match cursor {
            Some((c, _)) if self.backlog && (woken || self.urgent_full) => queries::ClaimFrom::MoreUrgentThan(c.0),
            Some((c, _)) if self.backlog => queries::ClaimFrom::After(c),
            _ => queries::ClaimFrom::Head,
        }
    }
}

/// Gives jobs claimed ahead back at shutdown: they go to the completer as released (back to pending,
/// the attempt not counted), without their handlers ever starting.
async fn release(ahead: BinaryHeap<Ahead>, done: &mpsc::Sender<Finished>) {
    for Ahead { job, entry, room } in ahead.into_sorted_vec() {
        let attempt = Attempt::of(&job, entry.row);
        let finished = Finished { attempt, outcome: Outcome::Released, started: std::time::Instant::now() };
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
