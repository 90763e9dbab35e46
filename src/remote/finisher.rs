//! Writes the ends of remote attempts in batches, like the engine's completer: whatever calls arrived
//! while the previous statement was in flight go out together in one `job_finish_leased`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use slog::{info, warn, Logger};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use tokio::time::timeout;

use crate::db::lease::{self, LeasedFinish};
use crate::db::{queries, ConnSlot, DbError, STATEMENT_DEADLINE};
use crate::job::{Job, JobStatus};
use crate::waiters::Waiters;

/// Largest number of outcomes written by one statement.
const MAX_BATCH: usize = 1000;

/// One remote call's outcome, and where its answer goes: the job as written, or `None` when the token
/// no longer held it.
pub(crate) struct Request {
    pub finish: LeasedFinish,
    pub queue: String,
    /// A release (the worker's, or of jobs claimed for a request that went away): announced after the
    /// write so that another worker takes the job at once.
    pub released: bool,
    pub reply: Option<oneshot::Sender<Result<Option<Job>, DbError>>>,
}

pub(crate) async fn run(url: String, waiters: Arc<Waiters>, log: Logger, mut rx: mpsc::UnboundedReceiver<Request>) {
    let log = log.new(slog::o!("component" => "remote-finisher"));
    // A dedicated connection with the statement prepared once, like the engine's completer.
    let mut conn = ConnSlot::new(&url, &log);
    let mut carry: Vec<Request> = Vec::new();
    loop {
        let mut pending = std::mem::take(&mut carry);
        if pending.is_empty() {
            match rx.recv().await {
                Some(r) => pending.push(r),
                None => return,
            }
        }
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => pending.push(r),
                Err(_) => break,
            }
        }
        // Each job at most once per statement: two calls for one job (a retried request, a confused
        // worker) are written one after the other, and the second finds the token spent.
        let mut seen = HashSet::new();
        let mut batch = Vec::with_capacity(pending.len());
        for r in pending {
            if seen.insert(r.finish.finish.id) {
                batch.push(r);
            } else {
                carry.push(r);
            }
        }
        write(&mut conn, &waiters, &log, batch).await;
    }
}

async fn write(conn: &mut ConnSlot, waiters: &Waiters, log: &Logger, mut batch: Vec<Request>) {
    // One lock order for every batch: by id.
    batch.sort_by_key(|r| r.finish.finish.id);
    let rows: Vec<LeasedFinish> = batch.iter().map(|r| r.finish.clone()).collect();
    let written = timeout(STATEMENT_DEADLINE, async { lease::job_finish_leased(conn.get().await?, &rows).await }).await;
    let mut results: Vec<Result<Option<Job>, DbError>> = match conn.settle(written) {
        Ok(jobs) => {
            let mut by_id: HashMap<Uuid, Job> = jobs.into_iter().map(|j| (j.id, j)).collect();
            batch.iter().map(|r| Ok(by_id.remove(&r.finish.finish.id))).collect()
        }
        Err(e) if !e.is_unavailable() && rows.len() > 1 => {
            // One refused value must not fail the others: write them one at a time.
            warn!(log, "batch of remote outcomes refused; writing them one by one"; "err" => %e);
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let one = timeout(STATEMENT_DEADLINE, async {
                    lease::job_finish_leased(conn.get().await?, std::slice::from_ref(row)).await
                })
                .await;
                out.push(conn.settle(one).map(|mut j| j.pop()));
            }
            out
        }
        Err(e) => {
            warn!(log, "could not record remote outcomes"; "count" => batch.len(), "err" => %e);
            let msg = e.to_string();
            let mut out = vec![Err(e)];
            out.extend((1..batch.len()).map(|_| Err(DbError::Pool(msg.clone()))));
            out
        }
    };

    let mut finished = Vec::new();
    let mut released = BTreeSet::new();
    for (r, result) in batch.iter().zip(results.iter_mut()) {
        if let Ok(Some(job)) = result {
            info!(log, "job finished";
                  "job_id" => %job.id, "queue" => &job.queue, "attempt" => r.finish.finish.attempt,
                  "status" => if r.released && job.status == JobStatus::Pending { "released" } else { job.status.as_str() },
                  "worker" => "remote", "err" => r.finish.finish.error.as_deref().unwrap_or(""));
            if job.status.is_finished() {
                finished.push(job.id);
            } else if r.released {
                released.insert(r.queue.clone());
            }
        }
    }
    waiters.finished(&finished);
    if !released.is_empty() {
        let queues: Vec<String> = released.into_iter().collect();
        let notified = async { queries::queue_notify(conn.get().await?.client(), &queues).await };
        if let Err(e) = notified.await {
            warn!(log, "could not announce released jobs"; "err" => %e);
        }
    }
    for (r, result) in batch.into_iter().zip(results) {
        answer(r, result);
    }
}

fn answer(r: Request, result: Result<Option<Job>, DbError>) {
    if let Some(tx) = r.reply {
        // The caller may have gone (client disconnected); the write stands either way.
        let _ = tx.send(result);
    }
}
