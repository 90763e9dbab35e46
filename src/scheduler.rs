//! The scheduler: runs on every instance and turns due ticks of cron schedules into jobs.
//!
//! Each pass is two short transactions on a pooled connection. First, schedules whose `next_run_at`
//! is NULL (inserted or changed in psql) get it computed. Then the due ones are taken
//! `FOR UPDATE SKIP LOCKED`; their jobs are inserted and `next_run_at` advanced in the same
//! transaction, so however many instances run, each tick creates one job, and a crash between the two
//! writes cannot double or lose a tick (the transaction never commits). Instances skip each other's
//! locked rows instead of waiting.
//!
//! Between passes it sleeps until the earliest `next_run_at` (a timer, not a poll), or until a change
//! of the table wakes it: the `schedules_notify` trigger sends `NOTIFY jobqueue_schedules`, which the
//! listener turns into [`Scheduler::wake`]. The sleep is capped at [`MAX_SLEEP`] as a safety net for a
//! notification lost while the listener reconnected (it also wakes the scheduler after a reconnect).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use slog::{info, warn, Logger};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::schedules::{self as sql, Advance, Fire};
use crate::db::{DbError, Pool};
use crate::schedule::{tick_key, Timetable};
use crate::supervisor::TaskResult;

/// Schedules handled per transaction.
const BATCH: i64 = 100;
/// Longest sleep without a due tick or a notification.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Shortest sleep when a schedule is due but another instance holds it: long enough not to spin on
/// its lock, short next to any tick.
const MIN_SLEEP: Duration = Duration::from_millis(20);
/// Wait after a failed pass (the database unreachable, say).
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct Scheduler {
    pub pool: Pool,
    /// Notified by the listener on `jobqueue_schedules` (and after it reconnects).
    pub wake: Arc<Notify>,
    pub log: Logger,
}

impl Scheduler {
    pub async fn run(self, shutdown: CancellationToken) -> TaskResult {
        let log = self.log.new(slog::o!("component" => "scheduler"));
        loop {
            // Enabled before the pass, so a change committed during it still wakes the next sleep.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let sleep = match self.pass(&log).await {
                Ok(next_due) => next_due,
                Err(e) => {
                    warn!(log, "schedule pass failed"; "err" => %e);
                    RETRY_AFTER
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = &mut woken => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// One pass: plan, fire everything due, and say how long to sleep.
    pub async fn pass(&self, log: &Logger) -> Result<Duration, DbError> {
        while self.plan(log).await? == BATCH as usize {}
        while self.fire(log).await? == BATCH as usize {}
        let client = self.pool.get().await?;
        Ok(match sql::schedule_next_due(&*client).await? {
            None => MAX_SLEEP,
            Some(s) if !s.is_finite() || s <= 0.0 => MIN_SLEEP,
            Some(s) => Duration::from_secs_f64(s).clamp(MIN_SLEEP, MAX_SLEEP),
        })
    }

    /// Computes `next_run_at` of schedules that have none; records why for those that cannot run.
    async fn plan(&self, log: &Logger) -> Result<usize, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (unplanned, now) = sql::schedules_unplanned(&tx, BATCH).await?;
        let advances: Vec<Advance> = unplanned
            .iter()
            .map(|s| {
                let next = Timetable::parse(&s.cron, &s.timezone).map(|t| t.next_after(now));
                advance(log, &s.name, next, None)
            })
            .collect();
        sql::schedule_advance(&tx, &advances).await?;
        tx.commit().await?;
        Ok(unplanned.len())
    }

    /// Creates the jobs of due ticks and advances their schedules, in one transaction.
    async fn fire(&self, log: &Logger) -> Result<usize, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (due, now) = sql::schedules_due(&tx, BATCH).await?;
        let mut fires = Vec::new();
        let mut advances = Vec::with_capacity(due.len());
        for s in &due {
            let Some(next_run_at) = s.next_run_at else { continue };
            match Timetable::parse(&s.cron, &s.timezone) {
                Ok(t) => {
                    let plan = t.due(next_run_at, now, s.missed);
                    fires.extend(plan.ticks.iter().map(|&tick| Fire {
                        schedule: s.name.clone(),
                        tick,
                        key: tick_key(&s.name, tick),
                    }));
                    advances.push(Advance {
                        name: s.name.clone(),
                        next_run_at: plan.next_run_at,
                        invalid: None,
                        last: None,
                    });
                }
                // Written valid, then made invalid in a way the trigger did not catch (a time zone
                // that left the database of this build): stop it, say why.
                Err(e) => advances.push(Advance {
                    name: s.name.clone(),
                    next_run_at: None,
                    invalid: Some(e.to_string()),
                    last: None,
                }),
            }
        }
        let created = sql::schedule_fire(&tx, &fires).await?;
        let mut newest: HashMap<&str, (chrono::DateTime<chrono::Utc>, uuid::Uuid)> = HashMap::new();
        for (name, tick, id) in &created {
            let e = newest.entry(name.as_str()).or_insert((*tick, *id));
            if *tick > e.0 {
                *e = (*tick, *id);
            }
        }
        for a in &mut advances {
            a.last = newest.get(a.name.as_str()).copied();
        }
        sql::schedule_advance(&tx, &advances).await?;
        tx.commit().await?;
        for (name, tick, id) in &created {
            info!(log, "schedule fired"; "schedule" => name, "tick" => %tick, "job_id" => %id);
        }
        Ok(due.len())
    }
}

/// The new timing of a schedule. A schedule without a next tick gets `invalid` set, never a bare NULL
/// `next_run_at`: NULL means "compute me", and every write wakes the schedulers, so a NULL that stays
/// NULL would have them recompute it in a loop.
fn advance(
    log: &Logger,
    name: &str,
    next: Result<Option<chrono::DateTime<chrono::Utc>>, crate::job::FieldError>,
    last: Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)>,
) -> Advance {
    let (next_run_at, invalid) = match next {
        Ok(Some(at)) => (Some(at), None),
        Ok(None) => (None, Some("cron: matches no future time".to_string())),
        Err(e) => (None, Some(e.to_string())),
    };
    if let Some(why) = &invalid {
        warn!(log, "schedule cannot run"; "schedule" => name, "err" => why);
    }
    Advance { name: name.to_string(), next_run_at, invalid, last }
}
