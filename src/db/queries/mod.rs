//! Every SQL statement the service runs, named noun-first (`job_insert`, `job_claim`, ...), by
//! concern: [`api`] (insert, read, list, cancel, retry, stats), [`engine`] (the hot path: claim,
//! heartbeat), [`finish`] (the completer's end of attempts), [`maintenance`] (rescue, retention),
//! [`ui`] (the dashboard's history and search); here, what they share (row decoding, the SQL of an
//! attempt's end), the channels, migrations and the benchmark's statements.
//!
//! Statements on the engine's hot path take a [`Conn`] and are prepared once per connection; the rest
//! take any client (a pooled one or a transaction).

use std::time::Duration;

use chrono::Utc;
use tokio_postgres::{Client, GenericClient, Row};

mod api;
mod engine;
mod finish;
mod insert;
mod maintenance;
mod ui;

pub use api::*;
pub use engine::*;
pub use finish::*;
pub use insert::*;
pub use maintenance::*;
pub use ui::*;

use super::DbError;
use crate::job::{Job, JobStatus};

/// Channel on which inserts (via the trigger) and the service announce runnable jobs. Payload: queue.
pub const CHANNEL_JOBS: &str = "jobqueue";
/// Channel on which cancellation of a processing job is announced. Payload: job id.
pub const CHANNEL_CANCEL: &str = "jobqueue_cancel";

/// Subscribes the listener's connection to the jobs, cancel and schedules channels.
pub async fn channels_listen(client: &Client) -> Result<(), DbError> {
    let schedules = super::schedules::CHANNEL_SCHEDULES;
    Ok(client.batch_execute(&format!("LISTEN {CHANNEL_JOBS}; LISTEN {CHANNEL_CANCEL}; LISTEN {schedules};")).await?)
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

/// Inserts `n` jobs with payload `{"n": i}` into `queue` in one statement (the benchmark's backlog), and
/// returns the server's clock just after it committed.
pub async fn job_insert_series(
    client: &impl GenericClient,
    queue: &str,
    n: i64,
) -> Result<chrono::DateTime<Utc>, DbError> {
    client
        .execute(
            "INSERT INTO jobs (queue, payload) SELECT $1, jsonb_build_object('n', i) FROM generate_series(1, $2::bigint) AS i",
            &[&queue, &n],
        )
        .await?;
    Ok(client.query_one("SELECT clock_timestamp()", &[]).await?.try_get(0)?)
}

/// From `since` to the last `finished_at` of `queue`: a drain's duration as the database recorded it.
pub async fn bench_drain_time(
    client: &impl GenericClient,
    queue: &str,
    since: chrono::DateTime<Utc>,
) -> Result<Duration, DbError> {
    let secs: f64 = client
        .query_one(
            "SELECT extract(epoch FROM max(finished_at) - $2)::float8 FROM jobs WHERE queue = $1 AND status = 'done'",
            &[&queue, &since],
        )
        .await?
        .try_get(0)?;
    Ok(Duration::from_secs_f64(secs.max(0.0)))
}

/// Percentiles (p50, p99, in ms) of insert-to-finished, `created_at` to `finished_at`, of the jobs of
/// `queue` created after `since`: the benchmark's latency, as the database recorded it.
pub async fn bench_finish_latency(
    client: &impl GenericClient,
    queue: &str,
    since: chrono::DateTime<Utc>,
) -> Result<(f64, f64), DbError> {
    let row = client
        .query_one(
            "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 'NaN'),
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 'NaN')
             FROM (SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 AS ms
                   FROM jobs WHERE queue = $1 AND created_at > $2 AND status = 'done') t",
            &[&queue, &since],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
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
        started_at: row.try_get("started_at")?,
    })
}

fn jobs_from_rows(rows: &[Row]) -> Result<Vec<Job>, DbError> {
    rows.iter().map(job_from_row).collect()
}

/// `j.errors` with `{attempt, started_at, at, error}` appended for the current attempt, keeping the
/// newest 20. The one definition of the error history, for every statement that records an error.
macro_rules! errors_appended {
    ($error:literal) => {
        concat!(
            "(CASE WHEN jsonb_array_length(j.errors) >= 20 THEN j.errors - 0 ELSE j.errors END)
                || jsonb_build_array(jsonb_build_object('attempt', j.attempts, 'started_at', j.started_at, 'at', now(), 'error', ",
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

/// A CTE `released` that promotes or cancels the waiting dependants of the jobs a data-modifying CTE
/// (`$ended`, with columns `id` and `status`) has just ended, in the same statement and so the same
/// transaction.
///
/// Only when some job has dependants at all (`jobqueue_has_dependants()`, see
/// `db/migrations/V12__dependants_check.sql`) are the batch's ids and statuses aggregated and
/// `jobqueue_release_dependants` called: the arrays are init plans, evaluated only in the branch that
/// uses them. A database without workflows pays one function call per statement instead of the
/// aggregation, the call and a probe of `job_dependencies` per job: SQL alone, 300-job finishes,
/// 0.3-0.5 µs a job less (docs/performance.md).
///
/// Both the question and the release come after every row of `$ended` is written (the count reads it
/// all first): a completion that waited for a row lock taken by an insert of dependants must see that
/// insert's edges, and both functions read with a fresh snapshot.
macro_rules! released_after {
    ($ended:literal) => {
        concat!(
            "released AS MATERIALIZED (
    SELECT CASE WHEN c.n > 0 AND jobqueue_has_dependants()
                THEN jobqueue_release_dependants((SELECT array_agg(id) FROM ",
            $ended,
            "), (SELECT array_agg(status) FROM ",
            $ended,
            "))
                ELSE 0 END AS n
    FROM (SELECT count(*) AS n FROM ",
            $ended,
            ") AS c
)"
        )
    };
}
pub(crate) use released_after;
