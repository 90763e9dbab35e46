//! Waiting for a job to finish (`GET /jobs/{id}?wait=30s`).
//!
//! A waiter is a oneshot channel registered under the job id. Jobs finished by this instance's
//! completer fire their waiters at once. Jobs finished elsewhere are found by one poller per instance
//! that asks, every `interval`, which of all the awaited ids are finished: one indexed query however
//! many clients wait, and none while nobody does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use slog::{debug, Logger};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{queries, Pool};

#[derive(Default)]
pub struct Waiters {
    waiting: Mutex<HashMap<Uuid, Vec<oneshot::Sender<()>>>>,
}

impl Waiters {
    /// Registers interest in `id`; the receiver completes when the job is seen finished.
    pub fn register(&self, id: Uuid) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("waiters poisoned").entry(id).or_default().push(tx);
        rx
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
