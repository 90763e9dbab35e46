//! The statements of the remote-worker lease protocol: claim over HTTP, and heartbeat and finish
//! fenced on the attempt's `lease_token` instead of the instance id.
//!
//! The claim is `queries::JOB_CLAIM` itself, so order, `SKIP LOCKED`, the pause check and the token
//! are exactly those of in-process workers. The finishing statement writes the same columns the same
//! way as `JOB_FINISH_BATCH`; only its fence differs. Change the two together.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use super::Conn;
use uuid::Uuid;

use super::queries::{
    claimed_next_due, errors_appended, finish_set, job_from_row, job_next_due, released_after, secs, JOB_CLAIM,
};
use super::DbError;
use crate::job::{Job, JobStatus};

/// A job claimed by a remote worker, with the credential of its attempt.
#[derive(Debug, Clone)]
pub struct Leased {
    pub job: Job,
    pub lease_token: String,
}

/// Jobs claimed, and when the queue's next scheduled job comes due if the claim came back short.
#[derive(Debug, Default)]
pub struct LeasedClaim {
    pub jobs: Vec<Leased>,
    pub next_due_in: Option<Duration>,
}

/// Claims up to `limit` jobs of `queue` for the remote worker `worker` (recorded in `locked_by`).
pub async fn job_claim_leased(
    client: &impl GenericClient,
    queue: &str,
    limit: i64,
    worker: &str,
    lease: Duration,
    default_max_attempts: i32,
) -> Result<LeasedClaim, DbError> {
    // Typed parameters: one round trip on a pooled connection, where an unprepared `query` costs two.
    let params: [(&(dyn ToSql + Sync), Type); 6] = [
        (&queue, Type::TEXT),
        (&limit, Type::INT8),
        (&worker, Type::TEXT),
        (&secs(lease), Type::FLOAT8),
        (&default_max_attempts, Type::INT4),
        (&true, Type::BOOL),
    ];
    let rows = client.query_typed(JOB_CLAIM, &params).await?;
    let mut claim = LeasedClaim::default();
    for row in &rows {
        claim.jobs.push(Leased { job: job_from_row(row)?, lease_token: row.try_get("lease_token")? });
    }
    claim.next_due_in = match rows.first() {
        Some(row) => claimed_next_due(row)?,
        None => job_next_due(client, queue).await?,
    };
    Ok(claim)
}

/// What a held attempt looks like to [`job_finish_leased`]'s caller: enough to apply the retry policy.
#[derive(Debug, Clone)]
pub struct Held {
    pub id: Uuid,
    pub queue: String,
    pub attempts: i32,
    pub max_attempts: Option<i32>,
    pub cancel_requested: bool,
}

/// Which of the `(ids[i], tokens[i])` pairs still hold their job, and the attempt each holds.
const JOBS_HELD: &str = "
SELECT j.id, j.queue, j.attempts, j.max_attempts, j.cancel_requested_at IS NOT NULL
FROM unnest($1::uuid[], $2::text[]) AS r(id, token)
JOIN jobs j ON j.id = r.id AND j.lease_token = r.token AND j.status = 'processing'";

pub async fn jobs_held(conn: &mut Conn, ids: &[Uuid], tokens: &[&str]) -> Result<Vec<Held>, DbError> {
    let (client, stmt) = conn.prepared(JOBS_HELD).await?;
    let rows = client.query(&stmt, &[&ids, &tokens]).await?;
    rows.iter()
        .map(|r| {
            Ok(Held {
                id: r.try_get(0)?,
                queue: r.try_get(1)?,
                attempts: r.try_get(2)?,
                max_attempts: r.try_get(3)?,
                cancel_requested: r.try_get(4)?,
            })
        })
        .collect()
}

/// The answer to a heartbeat whose token still held the job.
#[derive(Debug, Clone)]
pub enum Beat {
    /// Still held: the lease now runs until `lease_expires_at`.
    Held { lease_expires_at: DateTime<Utc>, cancel_requested: bool },
    /// Cancellation was requested and the lease had run out: the job is now cancelled.
    Cancelled(Box<Job>),
}

/// Extends the lease of one remotely held attempt.
///
/// A job whose cancellation was requested keeps its lease as it is (the worker is told to stop, and is
/// not allowed to hold the job forever by heartbeating); a heartbeat that arrives after that lease ran
/// out ends the job cancelled, as the rescuer would. `updated_at` and `locked_until` are in no index,
/// so the write stays HOT.
const JOB_HEARTBEAT_LEASED: &str = "
WITH held AS (
    SELECT id, cancel_requested_at IS NOT NULL AND locked_until < now() AS ending
    FROM jobs
    WHERE id = $1 AND lease_token = $2 AND status = 'processing'
    FOR UPDATE
)
UPDATE jobs j
SET status = CASE WHEN h.ending THEN 'cancelled' ELSE j.status END,
    locked_until = CASE WHEN h.ending THEN NULL
                        WHEN j.cancel_requested_at IS NULL THEN now() + make_interval(secs => $3)
                        ELSE j.locked_until END,
    locked_by = CASE WHEN h.ending THEN NULL ELSE j.locked_by END,
    lease_token = CASE WHEN h.ending THEN NULL ELSE j.lease_token END,
    finished_at = CASE WHEN h.ending THEN now() END,
    updated_at = now()
FROM held h
WHERE j.id = h.id
RETURNING j.*";

/// `None`: the token does not hold the job (lease lost, finished, wrong attempt, made up).
pub async fn job_heartbeat_leased(
    client: &impl GenericClient,
    id: Uuid,
    token: &str,
    lease: Duration,
) -> Result<Option<Beat>, DbError> {
    // The row may move to jobs_finished (its completion, a cancel) while this waits for its lock: a
    // serialization failure, after which the next statement sees where it went.
    let rows = super::retry_transient(|| async {
        Ok(client
            .query_typed(JOB_HEARTBEAT_LEASED, &[(&id, Type::UUID), (&token, Type::TEXT), (&secs(lease), Type::FLOAT8)])
            .await?)
    })
    .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let job = job_from_row(row)?;
    Ok(Some(match (job.status, job.locked_until) {
        (JobStatus::Processing, Some(until)) => {
            Beat::Held { lease_expires_at: until, cancel_requested: job.cancel_requested_at.is_some() }
        }
        _ => Beat::Cancelled(Box::new(job)),
    }))
}

/// One remote attempt's end, fenced on its token.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedFinish {
    pub finish: super::queries::Finish,
    pub lease_token: String,
}

/// Writes the outcomes of many remote attempts in one statement. The `SET` list is
/// `JOB_FINISH_BATCH`'s (see there for why each column is written so), plus clearing the token; the
/// fence is `lease_token` and `status = 'processing'`, which bind exactly one attempt.
const JOB_FINISH_LEASED: &str = concat!(
    "
WITH locked AS MATERIALIZED (
    -- Rows locked first, in id order, as every statement that locks many jobs does.
    SELECT id FROM jobs_active WHERE id = ANY($1::uuid[]) AND status = 'processing' ORDER BY id FOR UPDATE
),
-- Through the parent: a job that ends moves to jobs_finished.
finished AS (
UPDATE jobs j
SET ",
    finish_set!(),
    ",
    lease_token = NULL
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::float8[], $6::bool[], $7::text[])
     AS r(id, status, result, error, delay, uncount, token)
WHERE j.id = r.id AND r.id IN (SELECT id FROM locked) AND j.lease_token = r.token AND j.status = 'processing'
RETURNING j.*
), ",
    // Waiting dependants promoted or cancelled in the same statement, as the completer does.
    released_after!("finished"),
    "
SELECT f.* FROM finished f, released"
);

/// Returns the jobs written, as they are now; the others' tokens no longer held them. The caller
/// gives each id at most once per batch.
pub async fn job_finish_leased(conn: &mut Conn, batch: &[LeasedFinish]) -> Result<Vec<Job>, DbError> {
    let ids: Vec<Uuid> = batch.iter().map(|f| f.finish.id).collect();
    let statuses: Vec<&str> = batch.iter().map(|f| f.finish.status.as_str()).collect();
    // A JSON null result is stored as SQL NULL, like a job that has no result.
    let results: Vec<Option<&Value>> =
        batch.iter().map(|f| f.finish.result.as_ref().filter(|v| !v.is_null())).collect();
    let errors: Vec<Option<&str>> = batch.iter().map(|f| f.finish.error.as_deref()).collect();
    let delays: Vec<f64> = batch.iter().map(|f| secs(f.finish.delay)).collect();
    let uncount: Vec<bool> = batch.iter().map(|f| f.finish.uncount).collect();
    let tokens: Vec<&str> = batch.iter().map(|f| f.lease_token.as_str()).collect();
    let (client, stmt) = conn.prepared(JOB_FINISH_LEASED).await?;
    let rows = client.query(&stmt, &[&ids, &statuses, &results, &errors, &delays, &uncount, &tokens]).await?;
    rows.iter().map(job_from_row).collect()
}
