//! Maintenance that runs on every instance: the lease rescuer and the retention cleaner.
//!
//! Both are single `FOR UPDATE SKIP LOCKED` statements over small batches, so any number of instances
//! can run them at once without waiting on each other or doing the same work twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use slog::{info, warn, Logger};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::db::{queries, DbError, Pool};
use crate::job::JobStatus;

/// Rows per rescue or delete statement.
const BATCH: i64 = 500;

pub struct Maintenance {
    pub pool: Pool,
    /// How often expired leases are looked for.
    pub rescue_interval: Duration,
    /// How often old finished jobs are deleted.
    pub retention_interval: Duration,
    pub retention: Retention,
    /// Attempts allowed for a job that has none recorded (only rows set to processing by hand: the
    /// claim records the queue's value).
    pub default_max_attempts: i32,
    /// Local producers to wake when jobs of their queue are rescued.
    pub wakes: HashMap<String, Arc<Notify>>,
    pub log: Logger,
}

impl Maintenance {
    pub async fn run(self, shutdown: CancellationToken) -> crate::supervisor::TaskResult {
        let log = self.log.new(slog::o!("component" => "maintenance"));
        let mut tick = tokio::time::interval(self.rescue_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_retention = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            if let Err(e) = self.rescue(&log).await {
                warn!(log, "rescue of expired leases failed"; "err" => %e);
            }
            if Instant::now() >= next_retention {
                next_retention = Instant::now() + self.retention_interval;
                if let Err(e) = self.clean(&log, &shutdown).await {
                    warn!(log, "retention cleanup failed"; "err" => %e);
                }
            }
        }
    }

    /// Returns jobs whose lease expired to the queue (or fails or cancels them, see the query).
    pub async fn rescue(&self, log: &Logger) -> Result<usize, DbError> {
        let client = self.pool.get().await?;
        let stranded = queries::job_release_stranded(&*client, BATCH).await?;
        let mut woken = BTreeSet::new();
        for (id, queue, status) in &stranded {
            warn!(log, "released a waiting job whose parents had finished without releasing it";
                  "job_id" => %id, "queue" => queue, "status" => status.as_str());
            if *status == JobStatus::Pending {
                woken.insert(queue.clone());
            }
        }
        if !woken.is_empty() {
            let queues: Vec<String> = woken.into_iter().collect();
            queries::queue_notify(&*client, &queues).await?;
        }
        let mut total = 0;
        loop {
            let rescued = queries::job_rescue_expired(&*client, BATCH, self.default_max_attempts).await?;
            total += rescued.len();
            let mut queues = BTreeSet::new();
            for r in &rescued {
                warn!(log, "rescued job from an expired lease";
                      "job_id" => %r.id, "queue" => &r.queue, "attempt" => r.attempts,
                      "status" => r.status.as_str(), "lost_by" => &r.lost_by);
                if r.status == JobStatus::Pending {
                    queues.insert(r.queue.clone());
                }
            }
            if !queues.is_empty() {
                for q in &queues {
                    if let Some(w) = self.wakes.get(q) {
                        w.notify_one();
                    }
                }
                let queues: Vec<String> = queues.into_iter().collect();
                queries::queue_notify(&*client, &queues).await?;
            }
            if (rescued.len() as i64) < BATCH {
                return Ok(total);
            }
        }
    }

    /// Deletes finished jobs past their retention, a batch at a time.
    pub async fn clean(&self, log: &Logger, shutdown: &CancellationToken) -> Result<u64, DbError> {
        let r = self.retention;
        if r.done.is_none() && r.failed.is_none() && r.cancelled.is_none() {
            return Ok(0);
        }
        let client = self.pool.get().await?;
        let mut total = 0;
        loop {
            let n = queries::job_delete_expired(&*client, r.done, r.failed, r.cancelled, BATCH).await?;
            total += n;
            if (n as i64) < BATCH || shutdown.is_cancelled() {
                break;
            }
            // Let other work in between batches.
            tokio::task::yield_now().await;
        }
        if total > 0 {
            info!(log, "deleted finished jobs past retention"; "count" => total);
        }
        Ok(total)
    }
}
