//! Waiting for a job to finish (`GET /jobs/{id}?wait=30s`).
//!
//! A waiter is a oneshot channel registered under the job id. Jobs finished by this instance's
//! completer fire their waiters at once. Jobs finished elsewhere are found by one poller per instance
//! that asks, every `interval`, which of all the awaited ids are finished: one indexed query however
//! many clients wait, and none while nobody does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slog::{debug, Logger};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{queries, Pool};

pub struct Waiters {
    waiting: Mutex<HashMap<Uuid, Vec<oneshot::Sender<()>>>>,
    /// Requests waiting now, and the most allowed (`MAX_WAITERS`): each holds a connection and a
    /// little memory, so their number is bounded like everything else a client can hold.
    active: Arc<AtomicUsize>,
    max: usize,
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters::new(crate::config::HttpLimits::default().max_waiters)
    }
}

/// A registered wait: resolves when the job is seen finished; frees its place when dropped.
pub struct Wait {
    pub finished: oneshot::Receiver<()>,
    active: Arc<AtomicUsize>,
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Waiters {
    pub fn new(max: usize) -> Waiters {
        Waiters { waiting: Mutex::default(), active: Arc::default(), max }
    }

    /// Registers interest in `id`, or `None` when `max` requests already wait.
    pub fn register(&self, id: Uuid) -> Option<Wait> {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("waiters poisoned").entry(id).or_default().push(tx);
        Some(Wait { finished: rx, active: self.active.clone() })
    }

    pub fn finished(&self, ids: &[Uuid]) {
        if ids.is_empty() {
            return;
        }
        let mut waiting = self.waiting.lock().expect("waiters poisoned");
        if waiting.is_empty() {
            return;
        }
        for id in ids {
            for tx in waiting.remove(id).unwrap_or_default() {
                let _ = tx.send(());
            }
        }
    }

    /// Ids somebody still waits for; drops waiters whose request has gone.
    fn awaited(&self) -> Vec<Uuid> {
        let mut waiting = self.waiting.lock().expect("waiters poisoned");
        waiting.retain(|_, txs| {
            txs.retain(|tx| !tx.is_closed());
            !txs.is_empty()
        });
        waiting.keys().copied().collect()
    }

    pub async fn poll(
        &self,
        pool: Pool,
        interval: Duration,
        log: Logger,
        shutdown: CancellationToken,
    ) -> crate::supervisor::TaskResult {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            let ids = self.awaited();
            if ids.is_empty() {
                continue;
            }
            let finished = async { queries::job_finished_among(&*pool.get().await?, &ids).await };
            match finished.await {
                Ok(done) => self.finished(&done),
                Err(e) => debug!(log, "waiter poll failed"; "err" => %e),
            }
        }
    }
}
