//! The engine's hot path: claim, finish, heartbeat (prepared once per dedicated connection), and the
//! wake-up of other instances.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::super::{Conn, DbError};
use super::{errors_appended, finish_set, job_from_row, secs, status_of, CHANNEL_JOBS};
use crate::job::{Job, JobStatus};

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
macro_rules! claim_sql {
    ($after:literal) => {
        claim_sql!($after, "")
    };
    ($after:literal, $due:literal) => {
        concat!(
            "
WITH picked AS (
    SELECT id FROM jobs_active
    WHERE queue = $1 AND status = 'pending' AND run_at <= now()",
            $after,
            "
      AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $1 AND paused)
    ORDER BY priority, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs_active j
    SET status = 'processing',
        attempts = j.attempts + 1,
        updated_at = now(),
        started_at = now(),
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
            SELECT (SELECT min(priority) FROM jobs_active WHERE queue = $1 AND status = 'pending')
            UNION ALL
            SELECT (SELECT min(priority) FROM jobs_active WHERE queue = $1 AND status = 'pending' AND priority > prio.p)
            FROM prio WHERE prio.p IS NOT NULL
        )
        SELECT (SELECT run_at FROM jobs_active
                WHERE queue = $1 AND status = 'pending' AND priority = prio.p AND run_at > now()
                ORDER BY run_at LIMIT 1) AS run_at
        FROM prio WHERE prio.p IS NOT NULL
    ) d
    WHERE (SELECT count(*) FROM claimed) < $2",
            $due,
            "
)
SELECT claimed.*, next_due.next_due_in FROM next_due LEFT JOIN claimed ON true"
        )
    };
}

/// Public, as are the two other claims, so that a test can look at their plans
/// (`claiming_visits_only_the_claimed_jobs_whatever_the_statistics`).
pub const JOB_CLAIM: &str = claim_sql!("");

/// [`JOB_CLAIM`] after a position of the claim order (`$7`, `$8`, `$9`: priority, run_at, id): the
/// producer's next claim while it works through a backlog. Every claimed row leaves a dead entry at
/// the head of `jobs_claim_idx` until vacuum removes it, and a claim from the head walks all of them:
/// on a 300,000-job drain, SQL alone, 10,500 jobs/s from the head against 16,500 after the cursor.
/// Jobs that sort before the cursor (a more urgent insert, a retry, a released job) announce
/// themselves with a wake-up, and the producer then claims from the head again.
pub const JOB_CLAIM_AFTER: &str = claim_sql!(" AND (priority, run_at, id) > ($7, $8, $9)");

/// [`JOB_CLAIM`] of the jobs more urgent than a cursor's (`priority < $7`): the producer's answer to a
/// wake-up while it works through a backlog after a cursor. A claim from the head would walk every dead
/// entry up to the cursor (and so would its search for the next due job when it comes back short):
/// behind a million-job backlog an urgent job started 56 ms after its insert that way. This one is a
/// bounded range of `jobs_claim_idx`, and skips the next-due search (` AND false` is folded away by the
/// planner): the backlog goes on after it. Jobs of the cursor's priority that sort before it (a
/// released job, a job inserted with an old `run_at`) wait for the periodic claim from the head.
pub const JOB_CLAIM_MORE_URGENT: &str = claim_sql!(" AND priority < $7", " AND false");

/// Where a claim starts in the claim order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClaimFrom {
    /// The head: the most urgent runnable jobs.
    Head,
    /// After this position ([`JOB_CLAIM_AFTER`]).
    After(ClaimCursor),
    /// Only jobs of a priority more urgent than this ([`JOB_CLAIM_MORE_URGENT`]).
    MoreUrgentThan(i32),
}

/// Jobs claimed, and when the queue's next scheduled job comes due if the claim came back short.
pub struct Claimed {
    pub jobs: Vec<Job>,
    pub next_due_in: Option<Duration>,
}

/// A position in the claim order: priority, run_at, id.
pub type ClaimCursor = (i32, DateTime<Utc>, Uuid);

pub async fn job_claim(
    conn: &mut Conn,
    queue: &str,
    limit: i64,
    instance: &str,
    lease: Duration,
    default_max_attempts: i32,
    from: ClaimFrom,
) -> Result<Claimed, DbError> {
    let rows = match from {
        ClaimFrom::Head => {
            let (client, stmt) = conn.prepared(JOB_CLAIM).await?;
            client.query(&stmt, &[&queue, &limit, &instance, &secs(lease), &default_max_attempts, &false]).await?
        }
        ClaimFrom::MoreUrgentThan(priority) => {
            let (client, stmt) = conn.prepared(JOB_CLAIM_MORE_URGENT).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                [&queue, &limit, &instance, &secs(lease), &default_max_attempts, &false, &priority];
            client.query(&stmt, &params).await?
        }
        ClaimFrom::After((priority, run_at, id)) => {
            let (client, stmt) = conn.prepared(JOB_CLAIM_AFTER).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] =
                [&queue, &limit, &instance, &secs(lease), &default_max_attempts, &false, &priority, &run_at, &id];
            client.query(&stmt, &params).await?
        }
    };
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
pub const JOB_FINISH_BATCH: &str = concat!(
    "
-- Through the parent: a job that ends moves from jobs_active to jobs_finished (see V4__storage.sql).
WITH finished AS (
UPDATE jobs j
SET ",
    finish_set!(),
    "
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::float8[], $6::bool[], $8::int4[])
     AS r(id, status, result, error, delay, uncount, attempt)
-- The fence on status is written so that the planner cannot match it to `jobs_processing_idx`'s
-- predicate: with statistics taken before anything was processing, that index looked empty, and the
-- planner scanned all of it once per job of the batch (10,000 processing jobs: 1.5 ms a job). The
-- status list prunes the update to jobs_active. Without that index to misjudge, every plan probes
-- the primary key once per job, in the batch's order.
WHERE j.id = r.id AND j.attempts = r.attempt AND j.locked_by = $7
  AND j.status IN ('pending', 'processing', 'waiting') AND (j.status = 'processing') IS TRUE
RETURNING j.id, j.status
), released AS MATERIALIZED (
    -- Jobs waiting for the finished ones are promoted or cancelled in this same statement, so in the
    -- same transaction: one function call per batch, one index probe per job when none waits (see
    -- V7__workflows.sql). It reads all of `finished`, so it runs after every row is written.
    SELECT jobqueue_release_dependants(array_agg(id), array_agg(status)) AS n FROM finished
)
SELECT f.id, f.status FROM finished f, released"
);

/// Returns the ids that were written, with the status each got (a retry of a job whose cancellation
/// was requested is written as cancelled); the others had lost their lease.
pub async fn job_finish_batch(
    conn: &mut Conn,
    instance: &str,
    batch: &[Finish],
) -> Result<Vec<(Uuid, JobStatus)>, DbError> {
    // In id order: the statement locks rows in the order of its arrays (see JOB_FINISH_BATCH).
    let mut sorted: Vec<&Finish> = batch.iter().collect();
    sorted.sort_unstable_by_key(|f| f.id);
    let ids: Vec<Uuid> = sorted.iter().map(|f| f.id).collect();
    let statuses: Vec<&str> = sorted.iter().map(|f| f.status.as_str()).collect();
    let results: Vec<Option<&Value>> = sorted.iter().map(|f| f.result.as_ref()).collect();
    let errors: Vec<Option<&str>> = sorted.iter().map(|f| f.error.as_deref()).collect();
    let delays: Vec<f64> = sorted.iter().map(|f| secs(f.delay)).collect();
    let uncount: Vec<bool> = sorted.iter().map(|f| f.uncount).collect();
    let attempts: Vec<i32> = sorted.iter().map(|f| f.attempt).collect();
    let (client, stmt) = conn.prepared(JOB_FINISH_BATCH).await?;
    let rows =
        client.query(&stmt, &[&ids, &statuses, &results, &errors, &delays, &uncount, &instance, &attempts]).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, status_of(r, "status")?))).collect()
}

/// Runs [`JOB_FINISH_BATCH`] once, on the completer's new connection, for a job that exists only inside
/// a transaction that is then rolled back: the first real finish of a connection otherwise pays for
/// routing rows into `jobs_finished` (its relation and indexes opened for the first time),
/// `jobqueue_release_dependants`' first plan and the generic plan itself, 8 to 14 ms measured at the
/// start of a drain while every place of the room waited for it. Nothing is left behind: the row, its
/// move and the trigger's notification all go with the rollback.
pub async fn job_finish_warm_up(conn: &mut Conn, instance: &str) -> Result<(), DbError> {
    // BEGIN and ROLLBACK by hand: a `Transaction` would borrow the client that `job_finish_batch`
    // needs through `conn`, for its prepared statement.
    conn.client().batch_execute("BEGIN").await?;
    let finished = async {
        let row = conn
            .client()
            .query_one(
                "INSERT INTO jobs (queue, payload, status, attempts, locked_by, locked_until, started_at)
                 VALUES ('jobqueue-warm-up', '{}', 'processing', 1, $1, now() + interval '1 minute', now())
                 RETURNING id",
                &[&instance],
            )
            .await?;
        let finish = Finish {
            id: row.try_get(0)?,
            attempt: 1,
            status: JobStatus::Done,
            result: None,
            error: None,
            delay: Duration::ZERO,
            uncount: false,
        };
        job_finish_batch(conn, instance, &[finish]).await
    }
    .await;
    // Rolled back whatever happened; a broken connection rolls back by itself.
    let rolled_back = conn.client().batch_execute("ROLLBACK").await;
    let written = finished?;
    rolled_back?;
    if written.len() == 1 {
        Ok(())
    } else {
        Err(DbError::Decode(format!("the warm-up finish wrote {} rows instead of 1", written.len())))
    }
}

/// Extends the lease of every attempt this instance runs, in one statement. Returns the attempts still
/// held and whether cancellation was requested for each; an attempt missing from the answer was lost.
///
/// Fenced on the attempt, not only the job: a job may finish and be claimed again by this same instance
/// while a heartbeat is in flight, and the answer about the old attempt must not touch the new one.
///
/// The heartbeat never waits for a row lock (`SKIP LOCKED`). A row locked by someone else is most
/// often one the completer is finishing this very moment: waiting for it would end in a serialization
/// failure, because the completion moves the row to `jobs_finished` (a moved row cannot be locked), and
/// under a steady drain the completer always holds some of this instance's rows. A skipped row is
/// reported held, as read from the statement's snapshot, and not extended this time; the heartbeat runs
/// three times per lease, so the next one extends it. Since it waits for nothing, it cannot deadlock
/// with the statements that lock many jobs in id order.
const JOB_HEARTBEAT: &str = "
WITH locked AS MATERIALIZED (
    SELECT id FROM jobs_active
    WHERE id = ANY($1::uuid[]) AND locked_by = $3 AND status = 'processing'
    FOR UPDATE SKIP LOCKED
), extended AS (
    UPDATE jobs_active j SET locked_until = now() + make_interval(secs => $4), updated_at = now()
    FROM unnest($1::uuid[], $2::int4[]) AS r(id, attempt)
    WHERE j.id = r.id AND r.id IN (SELECT id FROM locked)
      AND j.attempts = r.attempt AND j.locked_by = $3 AND j.status = 'processing'
    RETURNING j.id, j.attempts, j.cancel_requested_at IS NOT NULL
)
SELECT * FROM extended
UNION ALL
SELECT j.id, j.attempts, j.cancel_requested_at IS NOT NULL
FROM unnest($1::uuid[], $2::int4[]) AS r(id, attempt)
JOIN jobs_active j ON j.id = r.id
WHERE r.id NOT IN (SELECT id FROM locked)
  AND j.attempts = r.attempt AND j.locked_by = $3 AND j.status = 'processing'";

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
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&ids, &numbers, &instance, &secs(lease)];
    // A row moved to jobs_finished between the statement's snapshot and its lock attempt is a
    // serialization failure even under SKIP LOCKED; the next statement no longer sees it processing.
    let mut tries = 0;
    let rows = loop {
        match client.query(&stmt, &params).await.map_err(DbError::from) {
            Err(e) if e.class() == crate::db::ErrorClass::Transient && tries < 3 => tries += 1,
            other => break other?,
        }
    };
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
