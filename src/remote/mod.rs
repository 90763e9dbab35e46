//! Remote workers: the lease protocol behind `POST /queues/{queue}/claim` and
//! `POST /jobs/{id}/heartbeat|complete|fail|snooze|release`, without HTTP (that is `api::remote`).
//!
//! A remote worker is not an instance: it holds jobs only through the `lease_token` of each attempt,
//! which every later call presents. Claims run `JOB_CLAIM` like the producers do; endings go through
//! the engine's `finish_for` and the same retry policies, and are written in batches by the
//! `finisher`; the rescuer returns expired remote leases exactly like in-process ones.

mod finisher;
pub mod wakes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::supervisor::TaskResult;
use slog::{debug, warn, Logger};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::lease::{self, Beat, Held, Leased, LeasedClaim};
use crate::db::queries::Finish;
use crate::db::{Connector, DbError, Pool};
use crate::job::{Job, JobStatus, RetryPolicy};
use crate::waiters::Waiters;
use crate::worker::{finish_for, Attempt, Outcome};
pub use wakes::QueueWakes;

/// Most long-polls (claims with a `wait`) one instance keeps open at once, by default. Each costs a task and a
/// socket, not a database connection (it holds one only while it claims); the cap keeps a flood of
/// idle workers from exhausting file descriptors. Over it, a claim is answered 503 with Retry-After.
pub const MAX_LONG_POLLS: usize = 1024;

/// Margin added to a scheduled job's due time so that the database's `now()` has passed `run_at`.
const TIMER_MARGIN: Duration = Duration::from_millis(3);

/// Why a lease call changed nothing.
#[derive(Debug)]
pub enum RemoteError {
    /// The token does not hold the job (or no longer): lease expired and rescued, job cancelled,
    /// another attempt, made up. `Some` when the call itself just ended the job (cancelled).
    LeaseLost(Option<Box<Job>>),
    /// Too many long-polls are open on this instance.
    Busy,
    Db(DbError),
}

impl From<DbError> for RemoteError {
    fn from(e: DbError) -> Self {
        RemoteError::Db(e)
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for RemoteError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        RemoteError::Db(e.into())
    }
}

/// A claim as validated by the API.
#[derive(Debug, Clone)]
pub struct Claim {
    pub queue: String,
    pub worker: String,
    pub max: i64,
    pub lease: Duration,
    pub wait: Duration,
}

/// How a remote attempt ended, as the worker reports it.
#[derive(Debug, Clone)]
pub enum Ending {
    Complete(serde_json::Value),
    Fail { error: String, retry: bool, retry_after: Option<Duration> },
    Snooze(Duration),
    Release,
}

pub struct RemoteSettings {
    /// For the writer of outcomes, which keeps a dedicated connection.
    pub connector: Arc<Connector>,
    pub pool: Pool,
    /// Retry policies of the queues configured on this instance.
    pub policies: HashMap<String, RetryPolicy>,
    /// The policy of every other queue (`Config::default_retry`).
    pub default_retry: RetryPolicy,
    /// Lease of a claim that names none (`JOB_LEASE`).
    pub default_lease: Duration,
    /// How often a long-poll looks at the table when no wake-up came (`POLL_INTERVAL`).
    pub poll_interval: Duration,
    pub waiters: Arc<Waiters>,
    /// Most long-polls open at once ([`MAX_LONG_POLLS`] in the service).
    pub max_long_polls: usize,
    pub log: Logger,
}

/// The retry policy of each queue: as configured on this instance, else the instance's default.
pub(crate) struct Policies {
    by_queue: HashMap<String, RetryPolicy>,
    default: RetryPolicy,
}

impl Policies {
    pub(crate) fn get(&self, queue: &str) -> &RetryPolicy {
        self.by_queue.get(queue).unwrap_or(&self.default)
    }
}

pub struct Remote {
    pool: Pool,
    policies: Arc<Policies>,
    pub default_lease: Duration,
    poll_interval: Duration,
    wakes: Arc<QueueWakes>,
    long_polls: Arc<Semaphore>,
    pub max_long_polls: usize,
    finisher: mpsc::UnboundedSender<finisher::Request>,
    log: Logger,
}

impl Remote {
    /// The remote-worker front and its batch writer, which the caller runs under its supervisor (the
    /// writer stops when the last `Remote` handle is gone).
    pub fn new(s: RemoteSettings) -> (Arc<Remote>, impl std::future::Future<Output = TaskResult> + Send + 'static) {
        let log = s.log.new(slog::o!("component" => "remote"));
        let (tx, rx) = mpsc::unbounded_channel();
        let policies = Arc::new(Policies { by_queue: s.policies, default: s.default_retry });
        let finisher = finisher::Finisher {
            connector: s.connector,
            policies: policies.clone(),
            waiters: s.waiters,
            log: log.clone(),
        };
        let writer = async move {
            finisher.run(rx).await;
            Ok(())
        };
        let remote = Arc::new(Remote {
            pool: s.pool,
            policies,
            default_lease: s.default_lease,
            poll_interval: s.poll_interval,
            wakes: Arc::new(QueueWakes::default()),
            long_polls: Arc::new(Semaphore::new(s.max_long_polls)),
            max_long_polls: s.max_long_polls,
            finisher: tx,
            log,
        });
        (remote, writer)
    }

    /// The per-queue wake-ups, for the listener.
    pub fn wakes(&self) -> Arc<QueueWakes> {
        self.wakes.clone()
    }

    /// Claims up to `c.max` jobs; with a `wait`, waits for the first one as long as that.
    ///
    /// The request's future may be dropped at any `.await` (hyper drops it when the client goes).
    /// While it waits that is harmless: nothing was claimed. The claim itself therefore runs on a task
    /// of its own, and if the request is gone by the time the claim returns, the task releases those
    /// jobs straight back to pending.
    pub async fn claim(self: &Arc<Self>, c: &Claim, shutdown: &CancellationToken) -> Result<Vec<Leased>, RemoteError> {
        let deadline = Instant::now() + c.wait;
        let _slot = match c.wait.is_zero() {
            true => None,
            false => Some(self.long_polls.clone().try_acquire_owned().map_err(|_| RemoteError::Busy)?),
        };
        let registration = (!c.wait.is_zero()).then(|| self.wakes.register(&c.queue));
        loop {
            // Enabled before the claim, so that a wake-up arriving while the claim runs is kept.
            let mut notified = registration.as_ref().map(|r| Box::pin(r.notify.notified()));
            if let Some(n) = notified.as_mut() {
                n.as_mut().enable();
            }
            let claimed = self.claim_once(c).await?;
            if claimed.jobs.len() as i64 == c.max {
                // There may be more: pass the wake-up on to the queue's next waiter.
                self.wakes.wake(&c.queue);
            }
            let claimed_at = chrono::Utc::now();
            for l in &claimed.jobs {
                crate::metrics::job_claimed(&l.job.queue, (claimed_at - l.job.run_at).as_seconds_f64());
            }
            let now = Instant::now();
            if !claimed.jobs.is_empty() || now >= deadline {
                return Ok(claimed.jobs);
            }
            let mut until = deadline.min(now + self.poll_interval);
            if let Some(due) = claimed.next_due_in {
                until = until.min(now + due + TIMER_MARGIN);
            }
            let notified = async {
                match notified {
                    Some(n) => n.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    async fn claim_once(self: &Arc<Self>, c: &Claim) -> Result<LeasedClaim, RemoteError> {
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let c = c.clone();
        tokio::spawn(async move {
            let max_attempts = this.policies.get(&c.queue).max_attempts;
            let claimed = async {
                let client = this.pool.get().await?;
                lease::job_claim_leased(&*client, &c.queue, c.max, &c.worker, c.lease, max_attempts).await
            }
            .await;
            if let Err(Ok(claimed)) = tx.send(claimed).map_err(|r| r.map(|c| c.jobs)) {
                if claimed.is_empty() {
                    return;
                }
                // Nobody will ever see these jobs: the request that asked for them is gone.
                warn!(this.log, "client went away during a claim; releasing its jobs";
                      "queue" => &c.queue, "count" => claimed.len());
                for l in claimed {
                    this.end(l.job.id, l.lease_token, Ending::Release, None);
                }
            }
        });
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RemoteError::Db(DbError::Pool("claim task ended without an answer".into()))),
        }
    }

    /// Extends the lease of one attempt.
    pub async fn heartbeat(&self, id: Uuid, token: &str, lease: Duration) -> Result<Beat, RemoteError> {
        let client = self.pool.get().await?;
        match lease::job_heartbeat_leased(&*client, id, token, lease).await? {
            None => Err(RemoteError::LeaseLost(None)),
            Some(Beat::Cancelled(job)) => {
                debug!(self.log, "cancelled at heartbeat after its lease ran out"; "job_id" => %id, "queue" => &job.queue);
                Err(RemoteError::LeaseLost(Some(job)))
            }
            Some(held) => Ok(held),
        }
    }

    /// Ends one attempt as the worker reports, and returns the job as written.
    pub async fn finish(&self, id: Uuid, token: &str, ending: Ending) -> Result<Job, RemoteError> {
        let (tx, rx) = oneshot::channel();
        self.end(id, token.to_string(), ending, Some(tx));
        match rx.await {
            Ok(Ok(Some(job))) => Ok(job),
            Ok(Ok(None)) => Err(RemoteError::LeaseLost(None)),
            Ok(Err(e)) => Err(RemoteError::Db(e)),
            Err(_) => Err(RemoteError::Db(DbError::Pool("remote finisher stopped".into()))),
        }
    }

    fn end(&self, id: Uuid, lease_token: String, ending: Ending, reply: Option<oneshot::Sender<finisher::Answer>>) {
        let request = finisher::Request { id, lease_token, ending, reply };
        if let Err(mpsc::error::SendError(r)) = self.finisher.send(request) {
            if let Some(tx) = r.reply {
                let _ = tx.send(Err(DbError::Pool("remote finisher stopped".into())));
            }
        }
    }
}

/// The row to write for a remote attempt's ending: the engine's `finish_for`, with the queue's policy.
pub(crate) fn finish_of(held: &Held, ending: Ending, policy: &RetryPolicy) -> Finish {
    let attempt =
        // Remote endings are written by the lease statements, which find jobs by id and token.
        Attempt { id: held.id, queue: held.queue.clone(), number: held.attempts, max_attempts: held.max_attempts, row: None };
    let failed = matches!(ending, Ending::Fail { .. });
    let outcome = match ending {
        Ending::Complete(v) => Outcome::Done(v),
        Ending::Fail { error, retry: true, retry_after } => Outcome::Error { message: error, after: retry_after },
        Ending::Fail { error, retry: false, .. } => Outcome::Fail(error),
        Ending::Snooze(d) => Outcome::Snooze(d),
        Ending::Release => Outcome::Released,
    };
    let mut finish = finish_for(&attempt, outcome, policy).expect("only a lost lease writes nothing");
    if failed && held.cancel_requested {
        // A remote worker that fails a job whose cancellation was requested ends it cancelled (with
        // its error recorded), whether or not it asked for a retry: it may well have failed because it
        // was told to stop. Written as a retry, which the statement turns into cancelled because
        // `cancel_requested_at` is set (a request is never withdrawn while the job is processing).
        finish.status = JobStatus::Pending;
        finish.delay = Duration::ZERO;
    }
    finish
}
