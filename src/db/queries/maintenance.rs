//! Maintenance: the rescue of expired leases and the retention cleaner.

use std::time::Duration;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::super::DbError;
use super::{errors_appended, secs, status_of};
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
)
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
RETURNING j.id, j.queue, j.status, j.attempts, e.lost_by"
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
    WHERE (status = 'done' AND finished_at < now() - make_interval(secs => $1))
       OR (status = 'failed' AND finished_at < now() - make_interval(secs => $2))
       OR (status = 'cancelled' AND finished_at < now() - make_interval(secs => $3))
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
DELETE FROM jobs j USING doomed WHERE j.id = doomed.id";

pub async fn job_delete_expired(
    client: &impl GenericClient,
    done: Option<Duration>,
    failed: Option<Duration>,
    cancelled: Option<Duration>,
    limit: i64,
) -> Result<u64, DbError> {
    let (d, f, c) = (done.map(secs), failed.map(secs), cancelled.map(secs));
    Ok(client.execute(JOB_DELETE_EXPIRED, &[&d, &f, &c, &limit]).await?)
}
