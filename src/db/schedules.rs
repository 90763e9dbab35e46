//! The statements of cron schedules (db/migrations/V6__schedules.sql): the API's create or replace,
//! read, list, delete, pause, resume and run-now, the config file's start-up sync, and the
//! scheduler's: fill in missing `next_run_at`, take the due schedules, insert their jobs, advance.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::DbError;
use crate::schedule::{Missed, ScheduleSpec};

/// Channel on which every change of `schedules` is announced (statement trigger). Payload: empty.
pub const CHANNEL_SCHEDULES: &str = "jobqueue_schedules";

/// A row of `schedules`.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub queue: String,
    pub payload: Value,
    pub priority: i32,
    pub max_attempts: Option<i32>,
    pub missed: String,
    pub paused: bool,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub invalid: Option<String>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn schedule_from_row(r: &Row) -> Result<Schedule, DbError> {
    Ok(Schedule {
        name: r.try_get("name")?,
        cron: r.try_get("cron")?,
        timezone: r.try_get("timezone")?,
        queue: r.try_get("queue")?,
        payload: r.try_get("payload")?,
        priority: r.try_get("priority")?,
        max_attempts: r.try_get("max_attempts")?,
        missed: r.try_get("missed")?,
        paused: r.try_get("paused")?,
        next_run_at: r.try_get("next_run_at")?,
        last_run_at: r.try_get("last_run_at")?,
        last_job_id: r.try_get("last_job_id")?,
        invalid: r.try_get("invalid")?,
        source: r.try_get("source")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Creates or replaces a schedule through `jobqueue_schedule`, the function psql users call, with the
/// `next_run_at` computed by the caller. Returns the row and whether it was created.
pub async fn schedule_put(
    client: &mut tokio_postgres::Client,
    spec: &ScheduleSpec,
    paused: Option<bool>,
    next_run_at: Option<DateTime<Utc>>,
) -> Result<(Schedule, bool), DbError> {
    let tx = client.transaction().await?;
    let existed = tx.query_opt("SELECT 1 FROM schedules WHERE name = $1", &[&spec.name]).await?.is_some();
    let row = tx
        .query_one(
            "SELECT * FROM jobqueue_schedule($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'api')",
            &[
                &spec.name,
                &spec.cron,
                &spec.queue,
                &spec.payload,
                &spec.timezone,
                &spec.priority,
                &spec.max_attempts,
                &spec.missed.as_str(),
                &paused,
                &next_run_at,
            ],
        )
        .await?;
    let schedule = schedule_from_row(&row)?;
    tx.commit().await?;
    Ok((schedule, !existed))
}

/// What the config file's sync did to one schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    Created,
    Updated,
    /// Identical already, or written through the API or SQL (which a file never overwrites).
    Kept,
}

/// The start-up sync of one `[schedules.NAME]` of the config file. The rule: a file creates a
/// schedule that does not exist, and updates one that a config file wrote (`source = 'config'`) when
/// its definition differs; it never touches one written through the API or SQL. Only start-up
/// writes, so two instances with different files do not fight: the one that started last wins, once.
const SCHEDULE_SYNC: &str = "
INSERT INTO schedules AS s (name, cron, timezone, queue, payload, priority, max_attempts, missed, next_run_at, source)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'config')
ON CONFLICT ON CONSTRAINT schedules_pkey DO UPDATE
SET cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, queue = EXCLUDED.queue, payload = EXCLUDED.payload,
    priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts, missed = EXCLUDED.missed,
    invalid = NULL,
    next_run_at = CASE WHEN (s.cron, s.timezone) IS NOT DISTINCT FROM (EXCLUDED.cron, EXCLUDED.timezone)
                        AND s.next_run_at IS NOT NULL
                       THEN s.next_run_at ELSE EXCLUDED.next_run_at END
WHERE s.source = 'config'
  AND (s.cron, s.timezone, s.queue, s.payload, s.priority, s.max_attempts, s.missed)
      IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.timezone, EXCLUDED.queue, EXCLUDED.payload, EXCLUDED.priority,
                        EXCLUDED.max_attempts, EXCLUDED.missed)
RETURNING xmax = 0 AS created";

pub async fn schedule_sync(
    client: &impl GenericClient,
    spec: &ScheduleSpec,
    next_run_at: Option<DateTime<Utc>>,
) -> Result<Synced, DbError> {
    let row = client
        .query_opt(
            SCHEDULE_SYNC,
            &[
                &spec.name,
                &spec.cron,
                &spec.timezone,
                &spec.queue,
                &spec.payload,
                &spec.priority,
                &spec.max_attempts,
                &spec.missed.as_str(),
                &next_run_at,
            ],
        )
        .await?;
    Ok(match row {
        None => Synced::Kept,
        Some(r) if r.try_get::<_, bool>(0)? => Synced::Created,
        Some(_) => Synced::Updated,
    })
}

pub async fn schedule_get(client: &impl GenericClient, name: &str) -> Result<Option<Schedule>, DbError> {
    let row = client.query_opt("SELECT * FROM schedules WHERE name = $1", &[&name]).await?;
    row.as_ref().map(schedule_from_row).transpose()
}

pub async fn schedule_list(client: &impl GenericClient) -> Result<Vec<Schedule>, DbError> {
    let rows = client.query("SELECT * FROM schedules ORDER BY name", &[]).await?;
    rows.iter().map(schedule_from_row).collect()
}

/// `true` if it existed. Its runs go with it; the jobs it created stay.
pub async fn schedule_delete(client: &impl GenericClient, name: &str) -> Result<bool, DbError> {
    Ok(client.execute("DELETE FROM schedules WHERE name = $1", &[&name]).await? == 1)
}

/// Pauses or resumes; resuming lets the schedule's trigger reset `next_run_at`, so ticks that fell in
/// the pause are not caught up. `None`: no such schedule.
pub async fn schedule_set_paused(
    client: &impl GenericClient,
    name: &str,
    paused: bool,
) -> Result<Option<Schedule>, DbError> {
    let row =
        client.query_opt("UPDATE schedules SET paused = $2 WHERE name = $1 RETURNING *", &[&name, &paused]).await?;
    row.as_ref().map(schedule_from_row).transpose()
}

/// Runs a schedule now through `jobqueue_schedule_run`; the new job's id, `None` without a schedule.
pub async fn schedule_run_now(client: &impl GenericClient, name: &str) -> Result<Option<Uuid>, DbError> {
    Ok(client.query_one("SELECT jobqueue_schedule_run($1)", &[&name]).await?.try_get(0)?)
}

/// One job a schedule created, as `GET /schedules/{name}` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub tick: DateTime<Utc>,
    pub job_id: Uuid,
    pub manual: bool,
    /// `None` once retention deleted the job.
    pub status: Option<String>,
}

pub async fn schedule_runs_recent(client: &impl GenericClient, name: &str, limit: i64) -> Result<Vec<Run>, DbError> {
    let rows = client
        .query(
            "SELECT r.tick, r.job_id, r.manual, (SELECT j.status FROM jobs j WHERE j.id = r.job_id) AS status
             FROM schedule_runs r WHERE r.schedule = $1 ORDER BY r.tick DESC LIMIT $2",
            &[&name, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(Run { tick: r.try_get(0)?, job_id: r.try_get(1)?, manual: r.try_get(2)?, status: r.try_get(3)? }))
        .collect()
}

// -------------------------------------------------------------------------------------------------
// The scheduler's statements.
// -------------------------------------------------------------------------------------------------

/// A schedule whose `next_run_at` must be computed, or which is due.
#[derive(Debug, Clone)]
pub struct Timing {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub missed: Missed,
    pub next_run_at: Option<DateTime<Utc>>,
}

fn timing_from_row(r: &Row) -> Result<Timing, DbError> {
    let missed: String = r.try_get("missed")?;
    Ok(Timing {
        name: r.try_get("name")?,
        cron: r.try_get("cron")?,
        timezone: r.try_get("timezone")?,
        // The CHECK constraint admits only the three; anything else is a schema this code does not know.
        missed: Missed::parse(&missed).ok_or_else(|| DbError::Decode(format!("schedules.missed = {missed:?}")))?,
        next_run_at: r.try_get("next_run_at")?,
    })
}

/// Locks up to `limit` schedules that need their `next_run_at` computed (written by psql, or reset by
/// a change of cron, timezone or pause), skipping those another scheduler holds. Returns them with the
/// database's `now()`, which every scheduler counts from, whatever its own clock says.
pub async fn schedules_unplanned(
    client: &impl GenericClient,
    limit: i64,
) -> Result<(Vec<Timing>, DateTime<Utc>), DbError> {
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await?.try_get(0)?;
    let rows = client
        .query(
            "SELECT name, cron, timezone, missed, next_run_at FROM schedules
             WHERE next_run_at IS NULL AND invalid IS NULL
             ORDER BY name LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await?;
    Ok((rows.iter().map(timing_from_row).collect::<Result<_, _>>()?, now))
}

/// Locks up to `limit` due schedules (`next_run_at <= now()`, not paused), skipping those another
/// scheduler holds, with the database's `now()`.
pub async fn schedules_due(client: &impl GenericClient, limit: i64) -> Result<(Vec<Timing>, DateTime<Utc>), DbError> {
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await?.try_get(0)?;
    let rows = client
        .query(
            "SELECT name, cron, timezone, missed, next_run_at FROM schedules
             WHERE next_run_at <= now() AND NOT paused
             ORDER BY next_run_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await?;
    Ok((rows.iter().map(timing_from_row).collect::<Result<_, _>>()?, now))
}

/// A tick to create a job for.
#[derive(Debug, Clone)]
pub struct Fire {
    pub schedule: String,
    pub tick: DateTime<Utc>,
    /// The job's unique key ([`crate::schedule::tick_key`]).
    pub key: String,
}

/// Inserts one job per tick from its schedule's template, and records each in `schedule_runs`. A tick
/// already recorded, or whose key a live job holds, is skipped rather than failing the batch: the
/// first guard is the row lock the caller holds on the schedule, these are the second and third.
/// Rows go in sorted by queue and key, as every batch insert does. Returns `(schedule, tick, job id)`
/// of the jobs created.
const SCHEDULE_FIRE: &str = "
WITH due AS (
    SELECT s.name, x.tick, x.key, s.queue, s.payload, s.priority, s.max_attempts
    FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS x(name, tick, key)
    JOIN schedules s ON s.name = x.name
    WHERE NOT EXISTS (SELECT 1 FROM schedule_runs r WHERE r.schedule = x.name AND r.tick = x.tick)
), ins AS (
    INSERT INTO jobs (queue, payload, priority, max_attempts, unique_key)
    SELECT queue, payload, priority, max_attempts, key FROM due ORDER BY queue, key
    ON CONFLICT DO NOTHING
    RETURNING id, queue, unique_key
)
INSERT INTO schedule_runs (schedule, tick, job_id)
SELECT d.name, d.tick, i.id FROM due d JOIN ins i ON i.queue = d.queue AND i.unique_key = d.key
RETURNING schedule, tick, job_id";

pub async fn schedule_fire(
    client: &impl GenericClient,
    fires: &[Fire],
) -> Result<Vec<(String, DateTime<Utc>, Uuid)>, DbError> {
    if fires.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = fires.iter().map(|f| f.schedule.as_str()).collect();
    let ticks: Vec<DateTime<Utc>> = fires.iter().map(|f| f.tick).collect();
    let keys: Vec<&str> = fires.iter().map(|f| f.key.as_str()).collect();
    let rows = client.query(SCHEDULE_FIRE, &[&names, &ticks, &keys]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect()
}

/// The new timing of one schedule.
#[derive(Debug, Clone)]
pub struct Advance {
    pub name: String,
    /// `None` with `invalid` set: the service cannot compute it.
    pub next_run_at: Option<DateTime<Utc>>,
    pub invalid: Option<String>,
    /// The newest job created now, if any.
    pub last: Option<(DateTime<Utc>, Uuid)>,
}

/// Writes `next_run_at` (or why it cannot be computed) and the last run of many schedules, and trims
/// their runs to the latest 100.
const SCHEDULE_ADVANCE: &str = "
WITH upd AS (
    UPDATE schedules s
    SET next_run_at = x.next_run_at,
        invalid = x.invalid,
        last_run_at = coalesce(x.last_run_at, s.last_run_at),
        last_job_id = coalesce(x.last_job_id, s.last_job_id)
    FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::timestamptz[], $5::uuid[])
         AS x(name, next_run_at, invalid, last_run_at, last_job_id)
    WHERE s.name = x.name
    RETURNING s.name
)
DELETE FROM schedule_runs r
USING upd
WHERE r.schedule = upd.name
  AND r.tick < (SELECT t.tick FROM schedule_runs t WHERE t.schedule = upd.name ORDER BY t.tick DESC OFFSET 99 LIMIT 1)";

pub async fn schedule_advance(client: &impl GenericClient, advances: &[Advance]) -> Result<(), DbError> {
    if advances.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = advances.iter().map(|a| a.name.as_str()).collect();
    let next: Vec<Option<DateTime<Utc>>> = advances.iter().map(|a| a.next_run_at).collect();
    let invalid: Vec<Option<&str>> = advances.iter().map(|a| a.invalid.as_deref()).collect();
    let last_at: Vec<Option<DateTime<Utc>>> = advances.iter().map(|a| a.last.map(|l| l.0)).collect();
    let last_id: Vec<Option<Uuid>> = advances.iter().map(|a| a.last.map(|l| l.1)).collect();
    client.execute(SCHEDULE_ADVANCE, &[&names, &next, &invalid, &last_at, &last_id]).await?;
    Ok(())
}

/// Seconds until the earliest `next_run_at` of a running schedule (negative when one is due), or
/// `None` when no schedule is waiting for a tick.
pub async fn schedule_next_due(client: &impl GenericClient) -> Result<Option<f64>, DbError> {
    Ok(client
        .query_one("SELECT extract(epoch FROM min(next_run_at) - now())::float8 FROM schedules WHERE NOT paused", &[])
        .await?
        .try_get(0)?)
}
