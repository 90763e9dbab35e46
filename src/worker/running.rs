//! The jobs this instance holds right now: what heartbeats extend, what cancellation reaches, what
//! shutdown releases. An entry lives from the claim until its outcome is written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::RowAddress;

/// Why a running handler was stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Someone asked for the job to be cancelled.
    Cancelled,
    /// The lease was lost (the rescuer gave the job to someone else); the result would be dropped.
    LeaseLost,
}

#[derive(Clone)]
pub(crate) struct Entry {
    /// Which attempt this entry tracks: an instance that lost a lease may claim the same job again,
    /// and the old attempt's end must not remove the new one.
    pub attempt: i32,
    /// Where the claim left the job's row (see [`crate::db::RowAddress`]).
    pub row: Option<RowAddress>,
    pub token: CancellationToken,
    pub reason: Arc<OnceLock<StopReason>>,
}

#[derive(Default)]
pub struct Running {
    jobs: Mutex<HashMap<Uuid, Entry>>,
    /// Asks the heartbeat to look at the held jobs now rather than at its next tick.
    recheck: Notify,
}

impl Running {
    pub(crate) fn insert(&self, id: Uuid, attempt: i32, row: Option<RowAddress>) -> Entry {
        let entry = Entry { attempt, row, token: CancellationToken::new(), reason: Arc::new(OnceLock::new()) };
        self.jobs.lock().expect("running map poisoned").insert(id, entry.clone());
        entry
    }

    pub(crate) fn remove(&self, attempts: impl IntoIterator<Item = (Uuid, i32)>) {
        let mut jobs = self.jobs.lock().expect("running map poisoned");
        for (id, attempt) in attempts {
            if jobs.get(&id).is_some_and(|e| e.attempt == attempt) {
                jobs.remove(&id);
            }
        }
    }

    /// Every attempt held now, as (job id, attempt number).
    pub fn attempts(&self) -> Vec<(Uuid, i32)> {
        self.jobs.lock().expect("running map poisoned").iter().map(|(id, e)| (*id, e.attempt)).collect()
    }

    pub fn len(&self) -> usize {
        self.jobs.lock().expect("running map poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancellation notifications may have been missed (the listener was not listening): asks the
    /// heartbeat to read the held jobs' cancel requests from the table at once. A notification only
    /// hurries what the heartbeat would find anyway, but its tick is a third of the lease away.
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    /// Resolves once [`Running::recheck`] has been called (a call while nobody waits is kept).
    pub(crate) async fn recheck_requested(&self) {
        self.recheck.notified().await
    }

    /// Signals the handler of `id`, whichever attempt this instance runs, if any. For cancellation,
    /// which is about the job. The first reason given sticks.
    pub fn stop(&self, id: Uuid, reason: StopReason) -> bool {
        let entry = self.jobs.lock().expect("running map poisoned").get(&id).cloned();
        Self::signal(entry, reason)
    }

    /// Signals the handler of one attempt, and only that attempt: news about an attempt that has
    /// already ended (a heartbeat answer that crossed its completion) must not stop the next attempt
    /// of the same job.
    pub fn stop_attempt(&self, id: Uuid, attempt: i32, reason: StopReason) -> bool {
        let entry = self.jobs.lock().expect("running map poisoned").get(&id).filter(|e| e.attempt == attempt).cloned();
        Self::signal(entry, reason)
    }

    fn signal(entry: Option<Entry>, reason: StopReason) -> bool {
        match entry {
            Some(e) => {
                let _ = e.reason.set(reason);
                e.token.cancel();
                true
            }
            None => false,
        }
    }
}
