//! Writes the ends of remote attempts in batches, like the engine's completer: whatever calls arrived
//! while the previous batch was in flight are handled together, with one read of the attempts the
//! tokens hold (`jobs_held`, for the retry policy's arithmetic) and one `job_finish_leased`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use slog::{info, warn, Logger};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use uuid::Uuid;

use super::{finish_of, Ending, Policies};
use crate::db::lease::{self, Held, LeasedFinish};
use crate::db::{queries, ConnSlot, Connector, DbError};
use crate::job::{Job, JobStatus};
use crate::waiters::Waiters;

/// Largest number of outcomes handled by one batch.
const MAX_BATCH: usize = 1000;

/// The answer to one call: the job as written, or `None` when the token did not hold it.
pub(crate) type Answer = Result<Option<Job>, DbError>;

/// One remote call's ending, and where its answer goes.
pub(crate) struct Request {
    pub id: Uuid,
    pub lease_token: String,
    pub ending: Ending,
    pub reply: Option<oneshot::Sender<Answer>>,
}

pub(crate) struct Finisher {
    pub connector: Arc<Connector>,
    pub policies: Arc<Policies>,
    pub waiters: Arc<Waiters>,
    pub log: Logger,
}

impl Finisher {
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Request>) {
        let log = self.log.new(slog::o!("component" => "remote-finisher"));
        // A dedicated connection with the statements prepared once, like the engine's completer.
        let mut conn = ConnSlot::new(&self.connector, &log);
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
            // Each job at most once per batch: two calls for one job (a retried request, a confused
            // worker) are handled one after the other, and the second finds the token spent.
            let mut seen = HashSet::new();
            let mut batch = Vec::with_capacity(pending.len());
            for r in pending {
                if seen.insert(r.id) {
                    batch.push(r);
                } else {
                    carry.push(r);
                }
            }
            self.handle(&mut conn, &log, batch).await;
        }
    }

    async fn handle(&self, conn: &mut ConnSlot, log: &Logger, mut batch: Vec<Request>) {
        // One lock order for every batch: by id.
        batch.sort_by_key(|r| r.id);
        let ids: Vec<Uuid> = batch.iter().map(|r| r.id).collect();
        let tokens: Vec<&str> = batch.iter().map(|r| r.lease_token.as_str()).collect();
        let deadline = conn.deadline();
        let held = timeout(deadline, async { lease::jobs_held(conn.get().await?, &ids, &tokens).await }).await;
        let held: HashMap<Uuid, Held> = match conn.settle(held) {
            Ok(rows) => rows.into_iter().map(|h| (h.id, h)).collect(),
            Err(e) => {
                warn!(log, "could not read the attempts of remote outcomes"; "count" => batch.len(), "err" => %e);
                let msg = e.to_string();
                let mut first = Some(e);
                for r in batch {
                    answer(r.reply, Err(first.take().unwrap_or_else(|| DbError::Pool(msg.clone()))));
                }
                return;
            }
        };

        // The rows to write, for the requests whose token still holds its job; the others lost it.
        let mut rows = Vec::with_capacity(batch.len());
        let mut writes = Vec::with_capacity(batch.len());
        for r in batch {
            match held.get(&r.id) {
                Some(h) => {
                    let release = matches!(r.ending, Ending::Release);
                    let finish = finish_of(h, r.ending, self.policies.get(&h.queue));
                    rows.push(LeasedFinish { finish, lease_token: r.lease_token });
                    writes.push((r.reply, release, h.queue.clone()));
                }
                None => answer(r.reply, Ok(None)),
            }
        }
        if rows.is_empty() {
            return;
        }
        let results = self.write(conn, log, &rows).await;

        let mut finished = Vec::new();
        let mut released = BTreeSet::new();
        for ((_, release, queue), (row, result)) in writes.iter().zip(rows.iter().zip(&results)) {
            let release = *release;
            if let Ok(Some(job)) = result {
                info!(log, "job finished";
                      "job_id" => %job.id, "queue" => queue, "attempt" => row.finish.attempt,
                      "status" => if release && job.status == JobStatus::Pending { "released" } else { job.status.as_str() },
                      "via" => "remote", "err" => row.finish.error.as_deref().unwrap_or(""));
                if job.status.is_finished() {
                    finished.push(job.id);
                } else if release {
                    released.insert(queue.clone());
                }
            }
        }
        self.waiters.finished(&finished);
        if !released.is_empty() {
            // Another worker (remote or in-process, on any instance) may take them at once.
            let queues: Vec<String> = released.into_iter().collect();
            let notified = async { queries::queue_notify(conn.get().await?.client(), &queues).await };
            if let Err(e) = notified.await {
                warn!(log, "could not announce released jobs"; "err" => %e);
            }
        }
        for ((reply, _, _), result) in writes.into_iter().zip(results) {
            answer(reply, result);
        }
    }

    /// Writes the rows in one statement; if the database refuses the batch, one at a time, so that one
    /// refused value does not fail the others.
    async fn write(&self, conn: &mut ConnSlot, log: &Logger, rows: &[LeasedFinish]) -> Vec<Answer> {
        let deadline = conn.deadline();
        let written = timeout(deadline, async { lease::job_finish_leased(conn.get().await?, rows).await }).await;
        match conn.settle(written) {
            Ok(jobs) => {
                let mut by_id: HashMap<Uuid, Job> = jobs.into_iter().map(|j| (j.id, j)).collect();
                rows.iter().map(|r| Ok(by_id.remove(&r.finish.id))).collect()
            }
            Err(e) if !e.is_unavailable() && rows.len() > 1 => {
                warn!(log, "batch of remote outcomes refused; writing them one by one"; "err" => %e);
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let one = timeout(deadline, async {
                        lease::job_finish_leased(conn.get().await?, std::slice::from_ref(row)).await
                    })
                    .await;
                    out.push(conn.settle(one).map(|mut j| j.pop()));
                }
                out
            }
            Err(e) => {
                warn!(log, "could not record remote outcomes"; "count" => rows.len(), "err" => %e);
                let msg = e.to_string();
                let mut first = Some(e);
                rows.iter().map(|_| Err(first.take().unwrap_or_else(|| DbError::Pool(msg.clone())))).collect()
            }
        }
    }
}

fn answer(reply: Option<oneshot::Sender<Answer>>, result: Answer) {
    if let Some(tx) = reply {
        // The caller may have gone (client disconnected); the write stands either way.
        let _ = tx.send(result);
    }
}
