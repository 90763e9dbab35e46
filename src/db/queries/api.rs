//! The API's statements besides inserts (`insert.rs`): read, list, cancel, retry, wait, stats.

use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

use super::super::DbError;
use super::{job_from_row, jobs_from_rows};
use crate::job::{Job, JobStatus};

pub async fn job_get(client: &impl GenericClient, id: Uuid) -> Result<Option<Job>, DbError> {
    let row = client.query_opt("SELECT * FROM jobs WHERE id = $1", &[&id]).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// A job's parents (in id order) and the number of waiting jobs that wait for it.
const JOB_DEPENDENCIES_OF: &str = "
SELECT array(SELECT parent FROM job_dependencies WHERE child = $1 ORDER BY parent),
       (SELECT count(*) FROM job_dependencies d JOIN jobs_active c ON c.id = d.child
        WHERE d.parent = $1 AND c.status = 'waiting')";

pub async fn job_dependencies_of(client: &impl GenericClient, id: Uuid) -> Result<(Vec<Uuid>, i64), DbError> {
    let row = client.query_one(JOB_DEPENDENCIES_OF, &[&id]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Filters for [`job_list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub queue: Option<String>,
    /// Keyset pagination: only jobs listed after this one (smaller ids: older, for time-ordered ids).
    pub before: Option<Uuid>,
    pub limit: i64,
    pub offset: i64,
}

/// Newest first, by id: ids are time-ordered (UUIDv7), so each partition's primary key is read
/// backwards, merged, and entered at the cursor with `before`; deep pages cost the same as the first.
/// (Jobs from before the V4 migration have random ids and list by them among the rest.)
const JOB_LIST: &str = "
SELECT * FROM jobs
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::text IS NULL OR queue = $2)
  AND ($3::uuid IS NULL OR id < $3)
ORDER BY id DESC
LIMIT $4 OFFSET $5";

pub async fn job_list(client: &impl GenericClient, f: &ListFilter) -> Result<Vec<Job>, DbError> {
    let status = f.status.map(JobStatus::as_str);
    let rows = client.query(JOB_LIST, &[&status, &f.queue, &f.before, &f.limit, &f.offset]).await?;
    jobs_from_rows(&rows)
}

/// What [`job_cancel`] did.
#[derive(Debug)]
pub enum Cancel {
    /// A pending job, now cancelled.
    Cancelled(Job),
    /// A processing job; its holder has been told to stop it.
    Requested(Job),
    /// Already finished; nothing changed.
    Finished(Job),
    NotFound,
}

/// Cancels through `jobqueue_cancel` (db/migrations/V5__sql_api.sql), the one definition of the
/// transition that psql users call too, then reads the job as the function left it. Both statements run
/// in one transaction: the function locked the row, so the read sees exactly what it did.
pub async fn job_cancel(client: &mut Client, id: Uuid) -> Result<Cancel, DbError> {
    // Locking a row that a concurrent completion has just moved to jobs_finished is a serialization
    // failure; the next try reads it there and answers that it is finished.
    let mut tries = 0;
    loop {
        match job_cancel_once(client, id).await {
            Err(e) if e.class() == crate::db::ErrorClass::Transient && tries < 3 => tries += 1,
            other => return other,
        }
    }
}

async fn job_cancel_once(client: &mut Client, id: Uuid) -> Result<Cancel, DbError> {
    let tx = client.transaction().await?;
    let outcome: String = tx.query_one("SELECT jobqueue_cancel($1)", &[&id]).await?.try_get(0)?;
    let job = job_get(&tx, id).await?;
    tx.commit().await?;
    Ok(match (outcome.as_str(), job) {
        ("cancelled", Some(job)) => Cancel::Cancelled(job),
        ("requested", Some(job)) => Cancel::Requested(job),
        ("finished", Some(job)) => Cancel::Finished(job),
        ("not_found", None) => Cancel::NotFound,
        (other, _) => return Err(DbError::Decode(format!("jobqueue_cancel answered {other:?} for job {id}"))),
    })
}

/// What [`job_retry`] did.
#[derive(Debug)]
pub enum Retry {
    Retried(Job),
    /// Not failed or cancelled; nothing changed.
    Refused(Job),
    NotFound,
}

/// Puts a failed or cancelled job back to pending, runnable now, with its attempts reset to zero (its
/// error history is kept), through `jobqueue_retry`, which also wakes the queue's workers.
pub async fn job_retry(client: &mut Client, id: Uuid) -> Result<Retry, DbError> {
    let tx = client.transaction().await?;
    let outcome: String = tx.query_one("SELECT jobqueue_retry($1)", &[&id]).await?.try_get(0)?;
    let job = job_get(&tx, id).await?;
    tx.commit().await?;
    Ok(match (outcome.as_str(), job) {
        ("retried", Some(job)) => Retry::Retried(job),
        ("refused", Some(job)) => Retry::Refused(job),
        ("not_found", None) => Retry::NotFound,
        (other, _) => return Err(DbError::Decode(format!("jobqueue_retry answered {other:?} for job {id}"))),
    })
}

/// Which of `ids` are finished. Used by the waiters of `GET /jobs/{id}?wait=`: one query for all of
/// them, however many there are.
pub async fn job_finished_among(client: &impl GenericClient, ids: &[Uuid]) -> Result<Vec<Uuid>, DbError> {
    let rows = client
        .query("SELECT id FROM jobs WHERE id = ANY($1) AND status IN ('done', 'failed', 'cancelled')", &[&ids])
        .await?;
    rows.iter().map(|r| r.try_get(0).map_err(DbError::from)).collect()
}

/// Per-queue numbers of `GET /stats` and the `jobqueue_stats` view.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStats {
    pub queue: String,
    pub pending: i64,
    pub processing: i64,
    pub done: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Seconds since the oldest runnable pending job became runnable; 0 when none waits.
    pub oldest_pending_age_secs: f64,
    pub finished_last_minute: i64,
}

pub async fn stats(client: &impl GenericClient) -> Result<Vec<QueueStats>, DbError> {
    let rows = client.query("SELECT * FROM jobqueue_stats ORDER BY queue", &[]).await?;
    rows.iter()
        .map(|r| {
            Ok(QueueStats {
                queue: r.try_get("queue")?,
                pending: r.try_get("pending")?,
                processing: r.try_get("processing")?,
                done: r.try_get("done")?,
                failed: r.try_get("failed")?,
                cancelled: r.try_get("cancelled")?,
                oldest_pending_age_secs: r.try_get("oldest_pending_age_secs")?,
                finished_last_minute: r.try_get("finished_last_minute")?,
            })
        })
        .collect()
}

pub async fn ping(client: &impl GenericClient) -> Result<(), DbError> {
    client.query_one("SELECT 1", &[]).await?;
    Ok(())
}
