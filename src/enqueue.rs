//! Group commit for `POST /jobs`: single-job inserts that arrive together are written in one
//! statement and one commit, each request answered only after that commit, with its own result.
//!
//! Every insert used to be its own transaction. A commit waits for its WAL flush, and a transaction
//! that notifies (the insert trigger does) takes a cluster-wide lock at commit, so concurrent inserts
//! serialised on commits: about 850 to 2,000 requests a second however many clients sent them. Here
//! the next statement takes whatever requests have queued while the previous one was in flight (up to
//! [`MAX_BATCH`]), so the cost of a commit is shared by every request that waited for it, and a lone
//! request on an idle service still goes straight through (nothing waits to fill a batch).
//!
//! One statement is in flight at a time: a second one running beside it would split the queue into
//! smaller batches, each paying its own statement and commit. Four concurrent statements served
//! 16 to 36% fewer requests a second than one (docs/performance.md). Yet one statement can be stuck:
//! an insert whose unique key a psql user's open transaction also inserted waits for that transaction.
//! So the next flusher waits at most [`STUCK_AFTER`] for the statement in flight, then starts beside
//! it, up to [`FLUSHERS`] statements in all.
//!
//! Errors stay per request: a failed statement is replayed one request at a time when the database
//! refused it (so only the request at fault gets the error), and answered to all when the database is
//! unreachable. The queue of waiting requests is bounded; a full queue makes callers wait, within the
//! API's request deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use slog::{error, Logger};
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;

use crate::db::{queries, ConnSlot, Connector, DbError, ErrorClass, Purpose};
use crate::job::{Job, NewJob};
use crate::supervisor::TaskResult;

/// Statements in flight at most, each flusher on its own connection (`jobqueue-enqueue`), where the
/// statement is prepared once; while all are busy, requests queue up and the next statement takes
/// them all.
const FLUSHERS: usize = 4;
/// How long the statement in flight holds the next one back. Far above a normal statement (0.3 to
/// 10 ms for 1 to 500 jobs), far below the API's request deadline.
const STUCK_AFTER: Duration = Duration::from_millis(50);
/// Requests per statement at most.
const MAX_BATCH: usize = 500;
/// Requests waiting for a statement at most.
const QUEUE_BOUND: usize = 10_000;

struct Request {
    job: NewJob,
    reply: oneshot::Sender<Result<(Job, bool), DbError>>,
}

/// The handle requests insert through.
pub struct Enqueuer {
    tx: mpsc::Sender<Request>,
}

impl Enqueuer {
    /// The handle, and the flushers to run (under the service's supervisor) for as long as the handle
    /// lives: they return once every handle is gone and the queue is empty.
    pub fn new(
        connector: Arc<Connector>,
        log: Logger,
    ) -> (Arc<Enqueuer>, impl Future<Output = TaskResult> + Send + 'static) {
        let (tx, rx) = mpsc::channel(QUEUE_BOUND);
        let rx = Arc::new(Mutex::new(rx));
        let turn = Arc::new(Semaphore::new(1));
        let run = async move {
            let flushers = (0..FLUSHERS).map(|_| flusher(rx.clone(), turn.clone(), connector.clone(), log.clone()));
            futures_util::future::join_all(flushers).await;
            Ok(())
        };
        (Arc::new(Enqueuer { tx }), run)
    }

    /// Inserts one job, or finds the live job holding its `unique_key`; `true` when inserted. Returns
    /// once the row is committed.
    pub async fn insert(&self, job: NewJob) -> Result<(Job, bool), DbError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request { job, reply }).await.map_err(|_| DbError::Lost("the service is stopping"))?;
        answer.await.map_err(|_| DbError::Lost("the service stopped before the insert was written"))?
    }
}

/// `turn` is held by the statement in flight; see the module docs.
async fn flusher(
    rx: Arc<Mutex<mpsc::Receiver<Request>>>,
    turn: Arc<Semaphore>,
    connector: Arc<Connector>,
    log: Logger,
) {
    // Opened on the first batch, and again after a failure.
    let mut conn = ConnSlot::with_purpose(&connector, Purpose::Enqueue, &log);
    loop {
        let (batch, turn) = {
            // One flusher at a time waits for the next request, then for the statement in flight (at
            // most STUCK_AFTER), then takes everything queued behind it meanwhile.
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            // Without the turn (the statement in flight is stuck), this one runs beside it.
            let turn = timeout(STUCK_AFTER, turn.clone().acquire_owned()).await.ok().and_then(Result::ok);
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            (batch, turn)
        };
        flush(batch, turn, &mut conn, &log).await;
    }
}

/// Writes `batch`; `turn` goes back as soon as its statement is over, before the answers.
async fn flush(batch: Vec<Request>, turn: Option<OwnedSemaphorePermit>, slot: &mut ConnSlot, log: &Logger) {
    // A request whose client has gone (its deadline passed, it hung up) is not inserted: nobody would
    // learn the job's id, and the client may already be retrying.
    let batch: Vec<Request> = batch.into_iter().filter(|r| !r.reply.is_closed()).collect();
    if batch.is_empty() {
        return;
    }
    let jobs: Vec<&NewJob> = batch.iter().map(|r| &r.job).collect();
    let many = timeout(slot.deadline(), async { queries::job_insert_many(slot.get().await?, &jobs).await }).await;
    let many = slot.settle(many);
    drop(turn);
    drop(jobs);
    match many {
        Ok(results) => {
            for (r, result) in batch.into_iter().zip(results) {
                let result = match result {
                    Some(done) => Ok(done),
                    None => insert_one(slot, &r.job).await,
                };
                let _ = r.reply.send(result);
            }
        }
        Err(e) if matches!(e.class(), ErrorClass::Unavailable | ErrorClass::Fatal) => answer_all(batch, e),
        Err(e) => {
            // Refused (a value the database would not store, a lost race): each request alone, so that
            // only the one at fault gets the error.
            if e.class() == ErrorClass::Bug {
                error!(log, "bug: a coalesced insert failed; inserting its jobs one by one"; "err" => %e);
            }
            for r in batch {
                let result = insert_one(slot, &r.job).await;
                let _ = r.reply.send(result);
            }
        }
    }
}

/// One job by itself ([`queries::job_insert`], which retries a key race), under the same deadline.
async fn insert_one(slot: &mut ConnSlot, job: &NewJob) -> Result<(Job, bool), DbError> {
    let one = timeout(slot.deadline(), async { queries::job_insert(slot.get().await?.client(), job).await }).await;
    slot.settle(one)
}

fn answer_all(batch: Vec<Request>, e: DbError) {
    let e = Arc::new(e);
    for r in batch {
        let _ = r.reply.send(Err(DbError::Shared(e.clone())));
    }
}
