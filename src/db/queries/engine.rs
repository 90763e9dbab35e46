//! The engine's hot path: claim, finish, heartbeat (prepared once per dedicated connection), and the
//! wake-up of other instances.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::super::{Conn, DbError, RowAddress};
use super::{job_from_row, secs, CHANNEL_JOBS};
use crate::job::Job;

/// In how many seconds the earliest future job of queue `$1` comes due, NULL if none is scheduled.
/// It walks `jobs_claim_idx` one probe per distinct priority (a loose index scan) instead of reading
/// every scheduled row.
macro_rules! next_due_sql {
    () => {
        "
    SELECT extract(epoch FROM min(d.run_at) - now())::float8
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
    ) d"
    };
}

/// Claims up to `$2` runnable jobs of queue `$1` for instance `$3` with a lease of `$4` seconds.
///
/// A CTE with `FOR UPDATE SKIP LOCKED` picks and locks the rows once; the UPDATE then finds them by
/// primary key. (`WHERE id IN (SELECT ... SKIP LOCKED)` may be re-evaluated and claim more rows than
/// asked.) The UPDATE matches `id = ANY(ARRAY(...))` rather than joining the CTE because a join let the
/// planner hash the whole table: on 100,000 pending rows a 1000-job claim took 32 ms that way and
/// 11 ms through the primary key.
///
/// When fewer jobs were picked than asked, the queue has no runnable job left, so the same statement
/// also returns in how many seconds its earliest future job comes due (the producer's timer), in the
/// column `next_due_in` of every row (an init plan evaluated once). A one-time filter
/// skips that lookup entirely while claims come back full. A claim that finds nothing returns no row to
/// carry it, so [`job_claim`] then asks [`job_next_due`]: one more statement, only on the
/// idle path.
///
/// The `UPDATE` is the statement itself, its rows sent as they are written. The claim used to be a
/// CTE joined to the next-due lookup, which copied every claimed row into a tuplestore and out again:
/// SQL alone, 250-job claims after a cursor, five alternating runs: 10.7-12.2 µs a job that way against
/// 9.9-11.3 now (docs/performance.md).
///
/// The rows picked are updated where the pick found them (`ctid`), not looked up again by id: they
/// are locked, so that version is the one to update. A 200,000-job drain's claims took 17.7-18.8 µs a
/// job that way against 19.8-20.3 through the primary key (docs/performance.md). A picked row that a
/// committed update had moved on since the statement's snapshot (the lock follows it to its newest
/// version) is not visible at that address to the update: it stays pending for the next claim. Each
/// claimed job comes back with the address of its new version, for the completer (see
/// [`crate::db::RowAddress`]).
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
    SELECT ctid FROM jobs_active
    WHERE queue = $1 AND status = 'pending' AND run_at <= now()",
            $after,
            "
      AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $1 AND paused)
    ORDER BY priority, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs_active j
SET status = 'processing',
    attempts = j.attempts + 1,
    updated_at = now(),
    started_at = now(),
    max_attempts = coalesce(j.max_attempts, $5),
    locked_by = $3,
    locked_until = now() + make_interval(secs => $4),
    lease_token = CASE WHEN $6 THEN replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '') END
WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM picked))
RETURNING j.*, j.ctid AS row_address, (",
            next_due_sql!(),
            "
    WHERE (SELECT count(*) FROM picked) < $2",
            $due,
            "
) AS next_due_in"
        )
    };
}

/// The next-due lookup of the claims, by itself: for a claim that found nothing.
const JOB_NEXT_DUE: &str = next_due_sql!();

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
    /// Where each claimed job's row lies now, `rows[i]` for `jobs[i]`.
    pub rows: Vec<RowAddress>,
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
    let mut addresses = Vec::with_capacity(rows.len());
    for row in &rows {
        jobs.push(job_from_row(row)?);
        addresses.push(row.try_get("row_address")?);
    }
    // A claim of more urgent jobs never looks for the next due job: the backlog goes on after it.
    let next_due_in = match rows.first() {
        Some(row) => claimed_next_due(row)?,
        None if matches!(from, ClaimFrom::MoreUrgentThan(_)) => None,
        None => job_next_due(conn.client(), queue).await?,
    };
    Ok(Claimed { jobs, rows: addresses, next_due_in })
}

/// The next due time a claim's rows carry (the same on every row).
pub fn claimed_next_due(row: &tokio_postgres::Row) -> Result<Option<Duration>, DbError> {
    Ok(due_in(row.try_get("next_due_in")?))
}

/// When the earliest future job of `queue` comes due, for a claim that found nothing and so has no row
/// to carry it ([`JOB_NEXT_DUE`]). Only on the idle path: sent with its parameter type, one round trip.
pub async fn job_next_due(client: &impl GenericClient, queue: &str) -> Result<Option<Duration>, DbError> {
    let rows = client.query_typed(JOB_NEXT_DUE, &[(&queue, tokio_postgres::types::Type::TEXT)]).await?;
    match rows.first() {
        Some(row) => Ok(due_in(row.try_get(0)?)),
        None => Ok(None),
    }
}

/// Seconds until the next due job as a timer: capped, since the producer polls anyway and a far-future
/// `run_at` must not overflow a timer.
fn due_in(seconds: Option<f64>) -> Option<Duration> {
    seconds.filter(|s| s.is_finite()).map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0)))
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
