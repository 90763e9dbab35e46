//! Every SQL statement the service runs, named noun-first (`job_insert`, `job_claim`, ...).
//!
//! Statements on the engine's hot path take a [`Conn`] and are prepared once per connection; the rest
//! take any client (a pooled one or a transaction).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Row};
use uuid::Uuid;

use super::{Conn, DbError};
use crate::job::{Job, JobStatus, NewJob};

/// Channel on which inserts (via the trigger) and the service announce runnable jobs. Payload: queue.
pub const CHANNEL_JOBS: &str = "jobqueue";
/// Channel on which cancellation of a processing job is announced. Payload: job id.
pub const CHANNEL_CANCEL: &str = "jobqueue_cancel";

/// Subscribes the dispatcher's connection to both channels.
pub async fn channels_listen(client: &Client) -> Result<(), DbError> {
    Ok(client.batch_execute(&format!("LISTEN {CHANNEL_JOBS}; LISTEN {CHANNEL_CANCEL};")).await?)
}

/// A round trip on a connection that may hold no transaction and prepare nothing (the listener's).
pub async fn connection_ping(client: &Client) -> Result<(), DbError> {
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// The migrations table as refinery creates it, for `jobqueue migrate --baseline`.
pub const MIGRATION_TABLE_CREATE: &str = "CREATE TABLE IF NOT EXISTS jobqueue_migrations (
    version int4 PRIMARY KEY, name varchar(255), applied_on varchar(255), checksum varchar(255))";

/// Records a migration as applied (by hand) without running it.
pub async fn migration_record(
    client: &impl GenericClient,
    version: i32,
    name: &str,
    checksum: u64,
) -> Result<bool, DbError> {
    let applied_on = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let n = client
        .execute(
            "INSERT INTO jobqueue_migrations (version, name, applied_on, checksum) VALUES ($1, $2, $3, $4)
             ON CONFLICT (version) DO NOTHING",
            &[&version, &name, &applied_on, &checksum.to_string()],
        )
        .await?;
    Ok(n == 1)
}

/// Whether the `jobs` table exists (a schema applied by hand, for the baseline).
pub async fn jobs_table_exists(client: &impl GenericClient) -> Result<bool, DbError> {
    Ok(client.query_one("SELECT to_regclass('jobs') IS NOT NULL", &[]).await?.try_get(0)?)
}

/// Arbitrary constant identifying the migration lock among advisory locks.
pub const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock(7215963403311410001)";
pub const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock(7215963403311410001)";

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn database_create(name: &str) -> String {
    format!("CREATE DATABASE {}", quote_ident(name))
}

pub fn database_drop(name: &str) -> String {
    format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name))
}

/// Inserts `n` jobs with payload `{"n": i}` into `queue` in one statement (the benchmark's backlog).
pub async fn job_insert_series(client: &impl GenericClient, queue: &str, n: i64) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "INSERT INTO jobs (queue, payload) SELECT $1, jsonb_build_object('n', i) FROM generate_series(1, $2::bigint) AS i",
            &[&queue, &n],
        )
        .await?)
}

/// Jobs not yet finished (pending or processing), in any queue.
pub async fn job_count_unfinished(client: &impl GenericClient) -> Result<i64, DbError> {
    Ok(client
        .query_one("SELECT count(*) FROM jobs WHERE status IN ('pending', 'processing')", &[])
        .await?
        .try_get(0)?)
}

/// A status column as [`JobStatus`]; the CHECK constraint admits only known ones, so anything else is a
/// bug (a schema this code does not know), never silently some other status.
fn status_of(row: &Row, column: &str) -> Result<JobStatus, DbError> {
    Ok(row.try_get(column)?)
}

pub fn job_from_row(row: &Row) -> Result<Job, DbError> {
    Ok(Job {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        payload: row.try_get("payload")?,
        status: status_of(row, "status")?,
        result: row.try_get("result")?,
        error: row.try_get("error")?,
        errors: row.try_get("errors")?,
        priority: row.try_get("priority")?,
        run_at: row.try_get("run_at")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        unique_key: row.try_get("unique_key")?,
        locked_by: row.try_get("locked_by")?,
        locked_until: row.try_get("locked_until")?,
        cancel_requested_at: row.try_get("cancel_requested_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn jobs_from_rows(rows: &[Row]) -> Result<Vec<Job>, DbError> {
    rows.iter().map(job_from_row).collect()
}

// ---------------------------------------------------------------------------------------------------
// API: insert, read, list, cancel, retry, stats
// ---------------------------------------------------------------------------------------------------

/// Inserts one job. With a `unique_key` that a pending or processing job of the same queue already
/// holds, inserts nothing and returns that job with `created = false`.
const JOB_INSERT: &str = "
WITH ins AS (
    INSERT INTO jobs (queue, payload, priority, run_at, max_attempts, unique_key)
    VALUES ($1, $2, $3, coalesce($4, now()), $5, $6)
    ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing')
    DO NOTHING
    RETURNING *
)
SELECT true AS created, ins.* FROM ins
UNION ALL
SELECT false, j.* FROM jobs j
WHERE $6::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ins)
  AND j.queue = $1 AND j.unique_key = $6 AND j.status IN ('pending', 'processing')";

/// Inserts one job, or finds the live job holding its `unique_key`; `true` when inserted.
/// Sent with explicit parameter types (`query_typed`): one round trip, where an unprepared `query`
/// costs two (prepare, then execute) on the pooled connections of the API.
pub async fn job_insert(client: &Client, job: &NewJob) -> Result<(Job, bool), DbError> {
    // The existing row is read under the statement's snapshot; if a concurrent transaction inserted it
    // after that snapshot was taken (ON CONFLICT waited for it), the SELECT cannot see it yet. A new
    // statement can, so try again; the same happens if the existing job finished in between.
    for _ in 0..5 {
        let rows = client
            .query_typed(
                JOB_INSERT,
                &[
                    (&job.queue, Type::TEXT),
                    (&job.payload, Type::JSONB),
                    (&job.priority, Type::INT4),
                    (&job.run_at, Type::TIMESTAMPTZ),
                    (&job.max_attempts, Type::INT4),
                    (&job.unique_key, Type::TEXT),
                ],
            )
            .await?;
        if let Some(row) = rows.first() {
            return Ok((job_from_row(row)?, row.try_get("created")?));
        }
    }
    Err(DbError::Contended("unique job insert kept racing with concurrent updates of the same key".into()))
}

/// Inserts many jobs in one statement: all or nothing, one notification per queue.
///
/// Rows go in sorted by queue and unique key: two batches whose keys overlap in a different order
/// would otherwise each wait for the other's key in the unique index, a deadlock PostgreSQL resolves
/// by failing one of them. In one order the second simply finds the key taken (a unique violation, a
/// 409). The ids are chosen here so that the answer can be put back into request order.
const JOB_INSERT_BATCH: &str = "
INSERT INTO jobs (id, queue, payload, priority, run_at, max_attempts, unique_key)
SELECT id, q, p, pr, coalesce(ra, now()), ma, uk
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::timestamptz[], $6::int4[], $7::text[])
     WITH ORDINALITY AS t(id, q, p, pr, ra, ma, uk, n)
ORDER BY q, uk, n
RETURNING *";

pub async fn job_insert_batch(client: &impl GenericClient, jobs: &[NewJob]) -> Result<Vec<Job>, DbError> {
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::new_v4()).collect();
    let queues: Vec<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
    let payloads: Vec<&Value> = jobs.iter().map(|j| &j.payload).collect();
    let priorities: Vec<i32> = jobs.iter().map(|j| j.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = jobs.iter().map(|j| j.run_at).collect();
    let max_attempts: Vec<Option<i32>> = jobs.iter().map(|j| j.max_attempts).collect();
    let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.unique_key.as_deref()).collect();
    let rows = client
        .query(JOB_INSERT_BATCH, &[&ids, &queues, &payloads, &priorities, &run_ats, &max_attempts, &keys])
        .await?;
    let mut by_id: std::collections::HashMap<Uuid, Job> =
        rows.iter().map(|r| job_from_row(r).map(|j| (j.id, j))).collect::<Result<_, _>>()?;
    ids.iter()
        .map(|id| by_id.remove(id).ok_or_else(|| DbError::Decode(format!("inserted job {id} was not returned"))))
        .collect()
}

pub async fn job_get(client: &impl GenericClient, id: Uuid) -> Result<Option<Job>, DbError> {
    let row = client.query_opt("SELECT * FROM jobs WHERE id = $1", &[&id]).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// Filters for [`job_list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub queue: Option<String>,
    /// Keyset pagination: only jobs older than this one (by `created_at`, then `id`).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
    pub offset: i64,
}

/// Newest first. With `before`, the index on (created_at DESC, id DESC) is entered at the cursor, so
/// deep pages cost the same as the first.
const JOB_LIST: &str = "
SELECT * FROM jobs
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::text IS NULL OR queue = $2)
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $5 OFFSET $6";

pub async fn job_list(client: &impl GenericClient, f: &ListFilter) -> Result<Vec<Job>, DbError> {
    let status = f.status.map(JobStatus::as_str);
    let (before_at, before_id) = match f.before {
        Some((at, id)) => (Some(at), Some(id)),
        None => (None, None),
    };
    let rows = client.query(JOB_LIST, &[&status, &f.queue, &before_at, &before_id, &f.limit, &f.offset]).await?;
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

pub async fn job_cancel(client: &mut Client, id: Uuid) -> Result<Cancel, DbError> {
    let tx = client.transaction().await?;
    let Some(row) = tx.query_opt("SELECT * FROM jobs WHERE id = $1 FOR UPDATE", &[&id]).await? else {
        return Ok(Cancel::NotFound);
    };
    let job = job_from_row(&row)?;
    let outcome = match job.status {
        JobStatus::Pending => {
            let row = tx
                .query_one(
                    "UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now() WHERE id = $1 RETURNING *",
                    &[&id],
                )
                .await?;
            Cancel::Cancelled(job_from_row(&row)?)
        }
        JobStatus::Processing => {
            let row = tx
                .query_one(
                    "UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
                     WHERE id = $1 RETURNING *",
                    &[&id],
                )
                .await?;
            // Delivered at commit to every instance's dispatcher; the holder cancels the handler.
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_CANCEL, &id.to_string()]).await?;
            Cancel::Requested(job_from_row(&row)?)
        }
        _ => Cancel::Finished(job),
    };
    tx.commit().await?;
    Ok(outcome)
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
/// error history is kept).
pub async fn job_retry(client: &mut Client, id: Uuid) -> Result<Retry, DbError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "UPDATE jobs SET status = 'pending', attempts = 0, run_at = now(), result = NULL, updated_at = now(),
                    finished_at = NULL, cancel_requested_at = NULL
             WHERE id = $1 AND status IN ('failed', 'cancelled')
             RETURNING *",
            &[&id],
        )
        .await?;
    let outcome = match row {
        Some(row) => {
            let job = job_from_row(&row)?;
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_JOBS, &job.queue]).await?;
            Retry::Retried(job)
        }
        None => match job_get(&tx, id).await? {
            Some(job) => Retry::Refused(job),
            None => Retry::NotFound,
        },
    };
    tx.commit().await?;
    Ok(outcome)
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

/// `j.errors` with `{attempt, at, error}` appended for the current attempt, keeping the newest 20. The
/// one definition of the error history, for every statement that records an error.
macro_rules! errors_appended {
    ($error:literal) => {
        concat!(
            "(CASE WHEN jsonb_array_length(j.errors) >= 20 THEN j.errors - 0 ELSE j.errors END)
                || jsonb_build_array(jsonb_build_object('attempt', j.attempts, 'at', now(), 'error', ",
            $error,
            "))"
        )
    };
}
pub(crate) use errors_appended;

/// The columns an attempt's end writes, from a batch row `r` (status, result, error, delay, uncount)
/// onto job `j`: the one definition for the in-process completer and the remote finisher. A job
/// whose cancellation was requested while it ran ends cancelled rather than going back to pending.
macro_rules! finish_set {
    () => {
        concat!(
            "status = CASE WHEN r.status = 'pending' AND j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                  ELSE r.status END,
    result = r.result,
    updated_at = now(),
    error = CASE WHEN r.status = 'done' THEN NULL ELSE coalesce(r.error, j.error) END,
    errors = CASE WHEN r.error IS NULL THEN j.errors ELSE ",
            errors_appended!("r.error"),
            " END,
    run_at = CASE WHEN r.status = 'pending' AND j.cancel_requested_at IS NULL
                  THEN now() + make_interval(secs => r.delay) ELSE j.run_at END,
    attempts = CASE WHEN r.uncount THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
    locked_by = NULL,
    locked_until = NULL,
    finished_at = CASE WHEN r.status <> 'pending' OR j.cancel_requested_at IS NOT NULL THEN now() END"
        )
    };
}
pub(crate) use finish_set;

// ---------------------------------------------------------------------------------------------------
// Engine: claim, finish, heartbeat (hot path, prepared), release, rescue, retention
// ---------------------------------------------------------------------------------------------------

/// Claims up to `$2` runnable jobs of queue `$1` for instance `$3` with a lease of `$4` seconds.
///
/// A CTE with `FOR UPDATE SKIP LOCKED` picks and locks the rows once; the UPDATE then finds them by
/// primary key. (`WHERE id IN (SELECT ... SKIP LOCKED)` may be re-evaluated and claim more rows than
/// asked.) The UPDATE matches `id = ANY(ARRAY(...))` rather than joining the CTE because a join let the
/// planner hash the whole table: on 100,000 pending rows a 1000-job claim took 32 ms that way and
/// 11 ms through the primary key.
///
/// When fewer jobs came back than asked, the queue has no runnable job left, so the same statement also
/// returns in how many seconds its earliest future job comes due (the producer's timer). That lookup
/// walks `jobs_claim_idx` one probe per distinct priority (a loose index scan) instead of reading every
/// scheduled row, and a one-time filter skips it entirely while claims come back full. The result has
/// one row per claimed job, or a single row whose job columns are NULL.
///
/// A paused queue (a row in `queues` with `paused`) yields nothing; the condition does not depend on
/// the row, so it is evaluated once per statement. A remote claim (`$6`) writes a fresh `lease_token`,
/// the credential remote workers present (see `db/migrations/V3__remote_workers.sql`); an in-process
/// claim writes NULL, which no token matches. Generating the token costs about 3 µs per row (two
/// `gen_random_uuid()`, measured with `EXPLAIN ANALYZE` over 100,000 rows), some 13% of the 23 µs a
/// claimed job costs, and in-process workers never present one.
pub(crate) const JOB_CLAIM: &str = "
WITH picked AS (
    SELECT id FROM jobs
    WHERE queue = $1 AND status = 'pending' AND run_at <= now()
      AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $1 AND paused)
    ORDER BY priority, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs j
    SET status = 'processing',
        attempts = j.attempts + 1,
        updated_at = now(),
        max_attempts = coalesce(j.max_attempts, $5),
        locked_by = $3,
        locked_until = now() + make_interval(secs => $4),
        lease_token = CASE WHEN $6 THEN replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '') END
    WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING j.*
), next_due AS (
    SELECT extract(epoch FROM min(d.run_at) - now())::float8 AS next_due_in
    FROM (
        WITH RECURSIVE prio(p) AS (
            SELECT (SELECT min(priority) FROM jobs WHERE queue = $1 AND status = 'pending')
            UNION ALL
            SELECT (SELECT min(priority) FROM jobs WHERE queue = $1 AND status = 'pending' AND priority > prio.p)
            FROM prio WHERE prio.p IS NOT NULL
        )
        SELECT (SELECT run_at FROM jobs
                WHERE queue = $1 AND status = 'pending' AND priority = prio.p AND run_at > now()
                ORDER BY run_at LIMIT 1) AS run_at
        FROM prio WHERE prio.p IS NOT NULL
    ) d
    WHERE (SELECT count(*) FROM claimed) < $2
)
SELECT claimed.*, next_due.next_due_in FROM next_due LEFT JOIN claimed ON true";

/// Jobs claimed, and when the queue's next scheduled job comes due if the claim came back short.
pub struct Claimed {
    pub jobs: Vec<Job>,
    pub next_due_in: Option<Duration>,
}

pub async fn job_claim(
    conn: &mut Conn,
    queue: &str,
    limit: i64,
    instance: &str,
    lease: Duration,
    default_max_attempts: i32,
) -> Result<Claimed, DbError> {
    let (client, stmt) = conn.prepared(JOB_CLAIM).await?;
    let rows = client.query(&stmt, &[&queue, &limit, &instance, &secs(lease), &default_max_attempts, &false]).await?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut next_due_in = None;
    for row in &rows {
        let due: Option<f64> = row.try_get("next_due_in")?;
        // Capped: the producer polls anyway, and a far-future run_at must not overflow a timer.
        next_due_in = due.filter(|s| s.is_finite()).map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0)));
        if row.try_get::<_, Option<Uuid>>("id")?.is_some() {
            jobs.push(job_from_row(row)?);
        }
    }
    Ok(Claimed { jobs, next_due_in })
}

/// The end of one attempt, as written by [`job_finish_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub id: Uuid,
    /// The attempt this outcome belongs to (the fence).
    pub attempt: i32,
    /// pending (retry, snooze, release), done, failed or cancelled.
    pub status: JobStatus,
    pub result: Option<Value>,
    /// Recorded in `error` and appended to the `errors` history.
    pub error: Option<String>,
    /// For status pending: run again after this long.
    pub delay: Duration,
    /// The attempt does not count (snooze, shutdown release): `attempts` goes back down by one.
    pub uncount: bool,
}

/// Writes the outcome of many attempts in one statement.
///
/// Fenced: a row is written only while this instance still holds it (`locked_by`, `processing`). A
/// job whose lease was lost to the rescuer is left alone, so a late result never overwrites another
/// attempt's.
///
/// The fence includes the attempt number, so an outcome from an earlier attempt of the same job (lease
/// lost, job claimed again) cannot end the current one. A job whose cancellation was requested while it
/// ran ends cancelled rather than going back to pending for a retry, snooze or release.
const JOB_FINISH_BATCH: &str = concat!(
    "
WITH locked AS MATERIALIZED (
    -- Every statement that locks many jobs locks them in id order (the heartbeat too), so that two
    -- of them on overlapping rows cannot deadlock. Found through the primary key (= ANY), one probe
    -- per id: a join against the unnested batch let the planner scan every processing row instead,
    -- which cut completions from thousands to hundreds a second on a 100,000-job drain.
    SELECT id FROM jobs
    WHERE id = ANY($1::uuid[]) AND locked_by = $7 AND status = 'processing'
    ORDER BY id
    FOR UPDATE
)
UPDATE jobs j
SET ",
    finish_set!(),
    "
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::float8[], $6::bool[], $8::int4[])
     AS r(id, status, result, error, delay, uncount, attempt)
-- The batch drives the update (one primary-key probe per row) and is filtered through a hash of the
-- locked set, which is therefore built, every lock taken, before the first row is written. Filtering
-- jobs by ANY(locked) instead let the planner drive from jobs and rescan the batch for every row:
-- 388 ms against 15 ms for 1,000 rows.
WHERE j.id = r.id AND r.id IN (SELECT id FROM locked)
  AND j.attempts = r.attempt AND j.locked_by = $7 AND j.status = 'processing'
RETURNING j.id, j.status"
);

/// Returns the ids that were written, with the status each got (a retry of a job whose cancellation
/// was requested is written as cancelled); the others had lost their lease.
pub async fn job_finish_batch(
    conn: &mut Conn,
    instance: &str,
    batch: &[Finish],
) -> Result<Vec<(Uuid, JobStatus)>, DbError> {
    let ids: Vec<Uuid> = batch.iter().map(|f| f.id).collect();
    let statuses: Vec<&str> = batch.iter().map(|f| f.status.as_str()).collect();
    let results: Vec<Option<&Value>> = batch.iter().map(|f| f.result.as_ref()).collect();
    let errors: Vec<Option<&str>> = batch.iter().map(|f| f.error.as_deref()).collect();
    let delays: Vec<f64> = batch.iter().map(|f| secs(f.delay)).collect();
    let uncount: Vec<bool> = batch.iter().map(|f| f.uncount).collect();
    let attempts: Vec<i32> = batch.iter().map(|f| f.attempt).collect();
    let (client, stmt) = conn.prepared(JOB_FINISH_BATCH).await?;
    let rows =
        client.query(&stmt, &[&ids, &statuses, &results, &errors, &delays, &uncount, &instance, &attempts]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, status_of(r, "status")?))).collect()
}

/// Extends the lease of every attempt this instance runs, in one statement. Returns the attempts still
/// held and whether cancellation was requested for each; an attempt missing from the answer was lost.
///
/// Fenced on the attempt, not only the job: a job may finish and be claimed again by this same instance
/// while a heartbeat is in flight, and the answer about the old attempt must not touch the new one.
/// Rows are locked in id order, as the completer's finishing statement locks them.
const JOB_HEARTBEAT: &str = "
WITH locked AS MATERIALIZED (
    SELECT id FROM jobs
    WHERE id = ANY($1::uuid[]) AND locked_by = $3 AND status = 'processing'
    ORDER BY id
    FOR UPDATE
)
UPDATE jobs j SET locked_until = now() + make_interval(secs => $4), updated_at = now()
FROM unnest($1::uuid[], $2::int4[]) AS r(id, attempt)
WHERE j.id = r.id AND r.id IN (SELECT id FROM locked)
  AND j.attempts = r.attempt AND j.locked_by = $3 AND j.status = 'processing'
RETURNING j.id, j.attempts, j.cancel_requested_at IS NOT NULL";

/// One held attempt as the heartbeat reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub id: Uuid,
    pub attempt: i32,
    pub cancel_requested: bool,
}

pub async fn job_heartbeat(
    conn: &mut Conn,
    attempts: &[(Uuid, i32)],
    instance: &str,
    lease: Duration,
) -> Result<Vec<Held>, DbError> {
    let ids: Vec<Uuid> = attempts.iter().map(|a| a.0).collect();
    let numbers: Vec<i32> = attempts.iter().map(|a| a.1).collect();
    let (client, stmt) = conn.prepared(JOB_HEARTBEAT).await?;
    let rows = client.query(&stmt, &[&ids, &numbers, &instance, &secs(lease)]).await?;
    rows.iter()
        .map(|r| Ok(Held { id: r.try_get(0)?, attempt: r.try_get(1)?, cancel_requested: r.try_get(2)? }))
        .collect()
}

/// Wakes the workers of `queues` on every instance.
pub async fn queue_notify(client: &impl GenericClient, queues: &[String]) -> Result<(), DbError> {
    if !queues.is_empty() {
        client.execute("SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q", &[&CHANNEL_JOBS, &queues]).await?;
    }
    Ok(())
}

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
