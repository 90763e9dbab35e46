//! Maintenance that runs on every instance: the lease rescuer, the retention cleaner, and a vacuum of
//! `jobs_active` after a burst.
//!
//! The first two are single `FOR UPDATE SKIP LOCKED` statements over small batches, so any number of
//! instances can run them at once without waiting on each other or doing the same work twice.
//!
//! Why the vacuum: every claimed job leaves a dead entry in `jobs_claim_idx` (and the row versions in
//! the heap) until a vacuum removes it, and a claim from the head of the queue walks every such entry.
//! After a 200,000-job drain an idle instance's claim of an empty queue took 5 to 9 ms, and a single
//! job took 16 to 28 ms from insert to finished instead of about 3, until autovacuum came round (up to
//! `autovacuum_naptime`, a minute by default, which is a server-wide setting). So once the partition
//! holds more dead versions than live ones (and at least [`VACUUM_MIN_DEAD`]), one instance vacuums it
//! at once: a small table after a drain, so a short vacuum.

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

/// Dead row versions in `jobs_active` (and more than live rows) before maintenance vacuums it.
pub const VACUUM_MIN_DEAD: i64 = 10_000;
/// How often the statistics are looked at (one small query of `pg_stat_user_tables`).
const VACUUM_CHECK_EVERY: Duration = Duration::from_secs(2);
/// At most one such vacuum (or autovacuum) this often.
const VACUUM_MIN_GAP: Duration = Duration::from_secs(10);
/// The bound of one vacuum, beyond the pool's statement timeout.
const VACUUM_TIMEOUT: Duration = Duration::from_secs(600);

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
        let mut vacuum_check = tokio::time::interval(VACUUM_CHECK_EVERY);
        vacuum_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = vacuum_check.tick() => {
                    if let Err(e) = self.vacuum_after_burst(&log).await {
                        warn!(log, "vacuum of jobs_active failed"; "err" => %e);
                    }
                    continue;
                }
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

    /// Vacuums `jobs_active` when dead row versions outnumber live ones (see the module's doc).
    /// Returns whether this instance vacuumed.
    pub async fn vacuum_after_burst(&self, log: &Logger) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let Some(dead) = queries::active_needs_vacuum(&*client, VACUUM_MIN_DEAD, VACUUM_MIN_GAP).await? else {
            return Ok(false);
        };
        let started = Instant::now();
        let vacuumed = queries::active_vacuum(&*client, VACUUM_TIMEOUT).await?;
        if vacuumed {
            info!(log, "vacuumed jobs_active after a burst";
                  "dead_rows" => dead, "ms" => started.elapsed().as_millis() as u64);
        }
        Ok(vacuumed)
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
