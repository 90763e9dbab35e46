//! The end of attempts: the completer's batch statement, written at the rows' addresses when the
//! claim gave them, by id otherwise, and its warm-up.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::super::{Conn, DbError, RowAddress};
use super::{errors_appended, finish_set, released_after, secs, status_of};
use crate::job::JobStatus;

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
    /// Where the claim left the job's row, if known: the write then goes there instead of through the
    /// primary key (see [`JOB_FINISH_BATCH_AT`]).
    pub row: Option<RowAddress>,
}

macro_rules! finish_batch_sql {
    ($set:expr, $arrays:expr, $columns:expr, $fence:literal, $find:literal) => {
        concat!(
            "
-- Through the parent: a job that ends moves from jobs_active to jobs_finished (see V4__storage.sql).
WITH finished AS (
UPDATE jobs j
SET ",
            $set,
            "
FROM unnest(",
            $arrays,
            ")
     AS r(",
            $columns,
            ")
-- The fence on status is written so that the planner cannot match it to `jobs_processing_idx`'s
-- predicate: with statistics taken before anything was processing, that index looked empty, and the
-- planner scanned all of it once per job of the batch (10,000 processing jobs: 1.5 ms a job). The
-- status list prunes the update to jobs_active. Without that index to misjudge, every plan finds each
-- job once (a probe of the primary key, or a read at its address), in the batch's order.
WHERE ",
            $find,
            " AND j.attempts = r.attempt AND j.locked_by = ",
            $fence,
            "
  AND j.status IN ('pending', 'processing', 'waiting') AND (j.status = 'processing') IS TRUE
RETURNING j.id, j.status
), ",
            released_after!("finished"),
            "
SELECT f.id, f.status FROM finished f, released"
        )
    };
}

/// The arrays of the general statements, `$8` being the attempts, and `$7` the instance.
macro_rules! finish_arrays {
    ($extra:literal) => {
        concat!("$1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::float8[], $6::bool[], $8::int4[]", $extra)
    };
}

macro_rules! finish_columns {
    ($extra:literal) => {
        concat!("id, status, result, error, delay, uncount, attempt", $extra)
    };
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
///
/// Locks are taken in id order, as by every statement that locks many jobs, so that two of them on
/// overlapping rows cannot deadlock: [`job_finish_batch`] sorts the batch by id, and the batch drives
/// the update (a nested loop from the unnested arrays, one primary-key probe per row), so each row is
/// locked as the update reaches it, in the batch's order. A separate `ORDER BY id FOR UPDATE` pass
/// before the update said the same thing explicitly and doubled the statement's cost: 24-42 µs a job
/// against 11-18 µs without it, finishing 10,000 claimed jobs in batches of 125
/// (docs/performance.md). A join against the unnested batch that let the planner drive from `jobs`
/// instead would lock in table order, and scan every processing row besides: the plan test
/// `finishing_a_batch_visits_each_job_once_whatever_the_statistics` holds it to the nested loop.
///
/// Public so that a test can look at its plan: each job must be found with one probe
/// (`db/migrations/V9__processing_by_id.sql` tells how it once was not).
pub const JOB_FINISH_BATCH: &str =
    finish_batch_sql!(finish_set!(), finish_arrays!(""), finish_columns!(""), "$7", "j.id = r.id");

/// [`JOB_FINISH_BATCH`] for jobs whose row address the claim returned (`$9`): each row is found at its
/// address (a TID scan) instead of through the primary key, still driven by the batch in id order,
/// and still matched on id and attempt, so an address that now holds another row writes nothing. SQL
/// alone, 20,000 claimed jobs finished in batches of 500: 14.9-15.1 µs a job against 16.3-16.4 by id.
/// A job whose row moved since its claim (a heartbeat extended it, a cancel was requested) is not
/// found at its address, and [`job_finish_batch`] writes it by id.
///
/// The id is matched as `(j.id = r.id) IS TRUE`, the same test in a form no index answers: planned on
/// a small table (the completer's warm-up), the primary key's probe looked cheaper than a TID scan's
/// page read, and the statement probed it for every job as before. Public so that a test can look at
/// its plan.
pub const JOB_FINISH_BATCH_AT: &str = finish_batch_sql!(
    finish_set!(),
    finish_arrays!(", $9::tid[]"),
    finish_columns!(", row_address"),
    "$7",
    "j.ctid = r.row_address AND (j.id = r.id) IS TRUE"
);

/// [`JOB_FINISH_BATCH_AT`] for a batch of plain successes (done, no error): what a drain writes. It
/// sets what `finish_set!` sets for such an outcome and nothing else, and takes only the arrays that
/// differ between the jobs (`$1` ids, `$2` results, `$4` attempts, `$5` addresses; `$3` the
/// instance). The general statement receives and unnests nine arrays a batch, five of them the same
/// value for every job of a drain, and computes every column's `CASE`: SQL alone, 300-job batches, five
/// runs: 10.2-11.5 µs a job against 11.6-12.7 (docs/performance.md). Public so that a test can look at its
/// plan.
pub const JOB_FINISH_DONE_AT: &str = finish_batch_sql!(
    "status = 'done',
    result = r.result,
    updated_at = now(),
    error = NULL,
    locked_by = NULL,
    locked_until = NULL,
    finished_at = now()",
    "$1::uuid[], $2::jsonb[], $4::int4[], $5::tid[]",
    "id, result, attempt, row_address",
    "$3",
    "j.ctid = r.row_address AND (j.id = r.id) IS TRUE"
);

/// Whether [`JOB_FINISH_DONE_AT`] writes `f` exactly as the general statement would.
fn plain_success(f: &Finish) -> bool {
    f.status == JobStatus::Done && f.error.is_none() && !f.uncount
}

/// Returns the ids that were written, with the status each got (a retry of a job whose cancellation
/// was requested is written as cancelled); the others had lost their lease. See
/// [`job_finish_batch_into`].
pub async fn job_finish_batch(
    conn: &mut Conn,
    instance: &str,
    batch: &[Finish],
) -> Result<Vec<(Uuid, JobStatus)>, DbError> {
    let mut written = Vec::with_capacity(batch.len());
    job_finish_batch_into(conn, instance, batch, &mut written).await?;
    Ok(written)
}

/// Writes `batch`, adding to `written` the ids written and the status each got, as each statement
/// commits.
///
/// Jobs with a row address go first, at their addresses ([`JOB_FINISH_BATCH_AT`], or
/// [`JOB_FINISH_DONE_AT`] when every one of them is a plain success); the others, and
/// those not found where the claim left them, then by id ([`JOB_FINISH_BATCH`]). Each statement is its
/// own transaction and locks in id order. If the second fails, what the first wrote is in `written`
/// all the same, so that the completer retries only the rest: a retry of the whole batch would find
/// the first statement's jobs finished already and report their leases lost. (Both statements in one
/// transaction would say the same with a `BEGIN` and a `COMMIT` round trip more for every batch.) In
/// a drain every row is where its claim left it, and the batch is one statement.
pub async fn job_finish_batch_into(
    conn: &mut Conn,
    instance: &str,
    batch: &[Finish],
    written: &mut Vec<(Uuid, JobStatus)>,
) -> Result<(), DbError> {
    // In id order: the statements lock rows in the order of their arrays (see JOB_FINISH_BATCH).
    let mut sorted: Vec<&Finish> = batch.iter().collect();
    sorted.sort_unstable_by_key(|f| f.id);
    let (at, by_id): (Vec<&Finish>, Vec<&Finish>) = sorted.into_iter().partition(|f| f.row.is_some());
    let first = written.len();
    if !at.is_empty() {
        written.extend(finish_statement(conn, instance, &at, true).await?);
    }
    // Usually every job was found at its address, and the rest is the jobs that had none, still in
    // id order; only the jobs not found need looking for.
    let mut rest = by_id;
    if written.len() - first < at.len() {
        let found: HashSet<Uuid> = written[first..].iter().map(|(id, _)| *id).collect();
        rest.extend(at.into_iter().filter(|f| !found.contains(&f.id)));
        rest.sort_unstable_by_key(|f| f.id);
    }
    if !rest.is_empty() {
        written.extend(finish_statement(conn, instance, &rest, false).await?);
    }
    Ok(())
}

/// Runs one of the two finishing statements over `batch`, already in id order.
async fn finish_statement(
    conn: &mut Conn,
    instance: &str,
    batch: &[&Finish],
    at_rows: bool,
) -> Result<Vec<(Uuid, JobStatus)>, DbError> {
    let ids: Vec<Uuid> = batch.iter().map(|f| f.id).collect();
    let results: Vec<Option<&Value>> = batch.iter().map(|f| f.result.as_ref()).collect();
    let attempts: Vec<i32> = batch.iter().map(|f| f.attempt).collect();
    // Only the statements at addresses take them, and they get only jobs that have one.
    let addresses: Vec<RowAddress> = if at_rows { batch.iter().filter_map(|f| f.row).collect() } else { Vec::new() };
    debug_assert!(!at_rows || addresses.len() == ids.len(), "every job of this statement has an address");
    let rows = if at_rows && batch.iter().all(|f| plain_success(f)) {
        let (client, stmt) = conn.prepared(JOB_FINISH_DONE_AT).await?;
        client.query(&stmt, &[&ids, &results, &instance, &attempts, &addresses]).await?
    } else {
        let statuses: Vec<&str> = batch.iter().map(|f| f.status.as_str()).collect();
        let errors: Vec<Option<&str>> = batch.iter().map(|f| f.error.as_deref()).collect();
        let delays: Vec<f64> = batch.iter().map(|f| secs(f.delay)).collect();
        let uncount: Vec<bool> = batch.iter().map(|f| f.uncount).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&ids, &statuses, &results, &errors, &delays, &uncount, &instance, &attempts];
        let sql = if at_rows {
            params.push(&addresses);
            JOB_FINISH_BATCH_AT
        } else {
            JOB_FINISH_BATCH
        };
        let (client, stmt) = conn.prepared(sql).await?;
        client.query(&stmt, &params).await?
    };
    rows.iter().map(|r| Ok((r.try_get(0)?, status_of(r, "status")?))).collect()
}

/// Runs the three finishing statements once, on the completer's new connection, for jobs that exist
/// only inside a transaction that is then rolled back (a success at its row's address, a failure at its
/// row's address, a success by id): the first real finish of a connection otherwise pays for routing
/// rows into `jobs_finished` (its relation and indexes opened for the first time), the generic plan
/// itself and, where workflows are used, `jobqueue_release_dependants`' first plan: 8 to 14 ms
/// measured at the start of a drain while every place of the room waited for it. Nothing is left
/// behind: the rows and their move go with the rollback (inserted processing, they wake nobody).
pub async fn job_finish_warm_up(conn: &mut Conn, instance: &str) -> Result<(), DbError> {
    // BEGIN and ROLLBACK by hand: a `Transaction` would borrow the client that `job_finish_batch`
    // needs through `conn`, for its prepared statements.
    conn.client().batch_execute("BEGIN").await?;
    let finished = async {
        // Into the partition, whose rows have an address to return.
        let rows = conn
            .client()
            .query(
                "INSERT INTO jobs_active (queue, payload, status, attempts, locked_by, locked_until, started_at)
                 SELECT 'jobqueue-warm-up', '{}', 'processing', 1, $1, now() + interval '1 minute', now()
                 FROM generate_series(1, 3)
                 RETURNING id, ctid",
                &[&instance],
            )
            .await?;
        let mut finishes = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            finishes.push(Finish {
                id: row.try_get(0)?,
                attempt: 1,
                status: if i == 1 { JobStatus::Failed } else { JobStatus::Done },
                result: None,
                error: (i == 1).then(|| "warm-up".to_string()),
                delay: Duration::ZERO,
                uncount: false,
                row: if i < 2 { Some(row.try_get(1)?) } else { None },
            });
        }
        // The success at its address alone: a batch of plain successes has a statement of its own.
        let mut written = job_finish_batch(conn, instance, &finishes[..1]).await?;
        written.extend(job_finish_batch(conn, instance, &finishes[1..]).await?);
        Ok::<_, DbError>(written)
    }
    .await;
    // Rolled back whatever happened; a broken connection rolls back by itself.
    let rolled_back = conn.client().batch_execute("ROLLBACK").await;
    let written = finished?;
    rolled_back?;
    if written.len() == 3 {
        Ok(())
    } else {
        Err(DbError::Decode(format!("the warm-up finish wrote {} rows instead of 3", written.len())))
    }
}
