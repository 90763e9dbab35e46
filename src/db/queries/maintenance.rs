//! Maintenance: the rescue of expired leases, the retention cleaner and the vacuum of `jobs_active` after a burst.

use std::time::Duration;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::super::DbError;
use super::{errors_appended, released_after, secs, status_of};
use crate::job::JobStatus;

/// A job whose lease expired, as returned to the queue by [`job_rescue_expired`].
#[derive(Debug, Clone)]
pub struct Rescued {
    pub id: Uuid,
    pub queue: String,
    pub status: JobStatus,
    pub attempts: i32,
    pub lost_by: String,
}

/// Returns jobs whose lease expired (their worker died or hung without heartbeats) to pending, or to
/// failed once their attempts are used up, or to cancelled if cancellation had been requested. One
/// `SKIP LOCKED` statement, so any number of instances can run it at once.
const JOB_RESCUE_EXPIRED: &str = concat!(
    "
WITH expired AS (
    SELECT id, locked_by AS lost_by,
           'worker lost: the lease held by ' || locked_by || ' expired' AS lost_error,
           CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN attempts >= coalesce(max_attempts, $2) THEN 'failed'
                ELSE 'pending' END AS new_status
    FROM jobs
    WHERE status = 'processing' AND locked_until < now()
    ORDER BY locked_until
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), rescued AS (
UPDATE jobs j
SET status = e.new_status,
    updated_at = now(),
    error = CASE WHEN e.new_status = 'cancelled' THEN j.error ELSE e.lost_error END,
    errors = CASE WHEN e.new_status = 'cancelled' THEN j.errors ELSE ",
    errors_appended!("e.lost_error"),
    " END,
    locked_by = NULL,
    locked_until = NULL,
    lease_token = NULL,
    finished_at = CASE WHEN e.new_status = 'pending' THEN NULL ELSE now() END
FROM expired e
WHERE j.id = e.id
RETURNING j.id, j.queue, j.status, j.attempts, e.lost_by
), ",
    // A job failed or cancelled here cancels its waiting dependants, in the same statement.
    released_after!("rescued"),
    "
SELECT r.id, r.queue, r.status, r.attempts, r.lost_by FROM rescued r, released"
);

pub async fn job_rescue_expired(
    client: &impl GenericClient,
    limit: i64,
    default_max_attempts: i32,
) -> Result<Vec<Rescued>, DbError> {
    let rows = client.query(JOB_RESCUE_EXPIRED, &[&limit, &default_max_attempts]).await?;
    rows.iter()
        .map(|r| {
            Ok(Rescued {
                id: r.try_get(0)?,
                queue: r.try_get(1)?,
                status: status_of(r, "status")?,
                attempts: r.try_get(3)?,
                lost_by: r.try_get(4)?,
            })
        })
        .collect()
}

/// Deletes up to `limit` finished jobs older than their status's retention (`None`: keep forever).
/// Small batches with `SKIP LOCKED`, so it never holds many locks and instances never wait on each
/// other.
const JOB_DELETE_EXPIRED: &str = "
WITH doomed AS (
    SELECT id FROM jobs
    WHERE ((status = 'done' AND finished_at < now() - make_interval(secs => $1))
           OR (status = 'failed' AND finished_at < now() - make_interval(secs => $2))
           OR (status = 'cancelled' AND finished_at < now() - make_interval(secs => $3)))
      -- Never a parent that a waiting job still needs: the rescuer's safety net reads its status.
      AND NOT EXISTS (SELECT 1 FROM job_dependencies d JOIN jobs_active c ON c.id = d.child
                      WHERE d.parent = jobs.id AND c.status = 'waiting')
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM jobs j USING doomed WHERE j.id = doomed.id RETURNING j.id
), edges AS (
    -- The edges of a deleted job go with it (no foreign key can: see V7__workflows.sql).
    DELETE FROM job_dependencies d USING deleted x WHERE d.child = x.id OR d.parent = x.id
)
SELECT count(*) FROM deleted";

pub async fn job_delete_expired(
    client: &impl GenericClient,
    done: Option<Duration>,
    failed: Option<Duration>,
    cancelled: Option<Duration>,
    limit: i64,
) -> Result<u64, DbError> {
    let (d, f, c) = (done.map(secs), failed.map(secs), cancelled.map(secs));
    let n: i64 = client.query_one(JOB_DELETE_EXPIRED, &[&d, &f, &c, &limit]).await?.try_get(0)?;
    Ok(n as u64)
}

/// The safety net behind the promotion that finishing statements do: waiting jobs none of whose
/// parents is still waiting, pending or processing, which a completion written by other means (a plain
/// UPDATE from psql) left behind. Each becomes pending if every parent is done, else cancelled naming
/// a parent that is not (its own dependants follow on the next run). Bounded, `SKIP LOCKED`, and
/// decided on the parents' statuses, not the counter, so it is right whatever the counter says.
const JOB_RELEASE_STRANDED: &str = "
WITH stranded AS (
    SELECT c.id FROM jobs_active c
    WHERE c.status = 'waiting'
      AND NOT EXISTS (SELECT 1 FROM job_dependencies d JOIN jobs_active p ON p.id = d.parent WHERE d.child = c.id)
    ORDER BY c.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), verdict AS (
    SELECT s.id,
           (SELECT 'parent ' || p.id || ' ended ' || p.status
            FROM job_dependencies d JOIN jobs_finished p ON p.id = d.parent
            WHERE d.child = s.id AND p.status <> 'done' ORDER BY p.id LIMIT 1) AS cause
    FROM stranded s
)
UPDATE jobs j
SET status = CASE WHEN v.cause IS NULL THEN 'pending' ELSE 'cancelled' END,
    waiting_on = 0,
    error = coalesce(v.cause, j.error),
    finished_at = CASE WHEN v.cause IS NULL THEN NULL ELSE now() END,
    updated_at = now()
FROM verdict v
WHERE j.id = v.id AND j.status = 'waiting'
RETURNING j.id, j.queue, j.status";

pub async fn job_release_stranded(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<(Uuid, String, JobStatus)>, DbError> {
    let rows = client.query(JOB_RELEASE_STRANDED, &[&limit]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, status_of(r, "status")?))).collect()
}

/// Whether `jobs_active` holds more dead row versions than `$1` and than live rows, and neither
/// autovacuum nor this check has vacuumed it in the last `$2` seconds. Reads the statistics
/// collector's counters (flushed by every backend within a second), never the table.
const ACTIVE_NEEDS_VACUUM: &str = "
SELECT n_dead_tup
FROM pg_stat_user_tables
WHERE relid = 'jobs_active'::regclass
  AND n_dead_tup > greatest($1::int8, n_live_tup)
  AND coalesce(greatest(last_vacuum, last_autovacuum), '-infinity') < now() - make_interval(secs => $2)";

/// The dead row versions of `jobs_active` when it is due for a vacuum (see [`ACTIVE_NEEDS_VACUUM`]).
pub async fn active_needs_vacuum(
    client: &impl GenericClient,
    min_dead: i64,
    min_gap: Duration,
) -> Result<Option<i64>, DbError> {
    let row = client.query_opt(ACTIVE_NEEDS_VACUUM, &[&min_dead, &secs(min_gap)]).await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// One instance vacuums at a time; the others skip (a session advisory lock, taken without waiting).
const VACUUM_LOCK_KEY: i64 = 7215963403311410002;

/// Vacuums `jobs_active` unless another instance (or autovacuum, `SKIP_LOCKED`) is at it. Returns
/// false when it was skipped. VACUUM cannot run in a transaction, so the connection's statement
/// timeout is raised for it with a session `SET` and put back with `RESET` (which returns to the value
/// the connection started with).
pub async fn active_vacuum(client: &impl GenericClient, timeout: Duration) -> Result<bool, DbError> {
    let locked: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&VACUUM_LOCK_KEY]).await?.try_get(0)?;
    if !locked {
        return Ok(false);
    }
    let ms = timeout.as_millis().max(1);
    // Separate round trips: statements sent together run as one implicit transaction.
    let vacuum = match client.batch_execute(&format!("SET statement_timeout = {ms}")).await {
        Ok(()) => client.batch_execute("VACUUM (SKIP_LOCKED) jobs_active").await,
        Err(e) => Err(e),
    };
    let reset = client.batch_execute("RESET statement_timeout").await;
    let unlock = client.query_one("SELECT pg_advisory_unlock($1)", &[&VACUUM_LOCK_KEY]).await;
    vacuum?;
    reset?;
    unlock?;
    Ok(true)
}
