//! The API's statements: insert, read, list, cancel, retry, stats.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

use super::super::{stored, Conn, DbError};
use std::collections::HashMap;

use super::{job_from_row, jobs_from_rows, status_of};
use crate::job::{Job, JobStatus, NewJob, Parent};

/// Inserts one job. With a `unique_key` that a pending or processing job of the same queue already
/// holds, inserts nothing and returns that job with `created = false`.
const JOB_INSERT: &str = "
WITH ins AS (
    -- Into the partition itself: ON CONFLICT needs the unique index, which only jobs_active has.
    INSERT INTO jobs_active (queue, payload, priority, run_at, max_attempts, unique_key)
    VALUES ($1, $2, $3, coalesce($4, now()), $5, $6)
    ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing', 'waiting')
    DO NOTHING
    RETURNING *
)
SELECT true AS created, ins.* FROM ins
UNION ALL
SELECT false, j.* FROM jobs j
WHERE $6::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ins)
  AND j.queue = $1 AND j.unique_key = $6 AND j.status IN ('pending', 'processing', 'waiting')";

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

/// Inserts the jobs of many independent requests in one statement and one commit (see
/// [`crate::enqueue`]): each row as [`JOB_INSERT`] would, a `unique_key` held by a live job yielding
/// that job instead. Rows go in sorted by queue and key, as in [`JOB_INSERT_BATCH`], so that
/// concurrent statements take the unique index's locks in one order.
const JOB_INSERT_MANY: &str = "
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::timestamptz[], $6::int4[], $7::text[])
        WITH ORDINALITY AS t(id, q, p, pr, ra, ma, uk, n)
), ins AS (
    INSERT INTO jobs_active (id, queue, payload, priority, run_at, max_attempts, unique_key)
    SELECT id, q, p, pr, coalesce(ra, now()), ma, uk FROM input ORDER BY q, uk, n
    ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing', 'waiting')
    DO NOTHING
    RETURNING *
)
SELECT true AS created, ins.* FROM ins
UNION ALL
SELECT false, j.* FROM input i JOIN jobs_active j ON j.queue = i.q AND j.unique_key = i.uk
WHERE i.uk IS NOT NULL AND j.status IN ('pending', 'processing', 'waiting') AND i.id NOT IN (SELECT id FROM ins)";

/// The columns of new jobs as arrays, one element per job, for the statements that insert from
/// `unnest(...)`: the one place that maps a [`NewJob`] onto the table's columns.
struct NewJobColumns<'a> {
    queues: Vec<&'a str>,
    payloads: Vec<&'a Value>,
    priorities: Vec<i32>,
    run_ats: Vec<Option<DateTime<Utc>>>,
    max_attempts: Vec<Option<i32>>,
    keys: Vec<Option<&'a str>>,
}

impl<'a> NewJobColumns<'a> {
    fn of(jobs: impl IntoIterator<Item = &'a NewJob>) -> Self {
        let mut c = NewJobColumns {
            queues: Vec::new(),
            payloads: Vec::new(),
            priorities: Vec::new(),
            run_ats: Vec::new(),
            max_attempts: Vec::new(),
            keys: Vec::new(),
        };
        for j in jobs {
            c.queues.push(&j.queue);
            c.payloads.push(&j.payload);
            c.priorities.push(j.priority);
            c.run_ats.push(j.run_at);
            c.max_attempts.push(j.max_attempts);
            c.keys.push(j.unique_key.as_deref());
        }
        c
    }
}

/// Per job, in order: the job inserted (`true`) or the live job holding its key (`false`), or `None`
/// when neither could be told from this statement's snapshot (a key taken by a concurrent transaction,
/// or by an earlier job of the same call): insert those with [`job_insert`], which retries.
///
/// Prepared once per connection (`Conn`): parsing and planning this statement anew for every batch was
/// a fifth of the server's CPU under a stream of single-job requests.
pub async fn job_insert_many(conn: &mut Conn, jobs: &[&NewJob]) -> Result<Vec<Option<(Job, bool)>>, DbError> {
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let NewJobColumns { queues, payloads, priorities, run_ats, max_attempts, keys } =
        NewJobColumns::of(jobs.iter().map(|j| &**j));
    let (client, stmt) = conn.prepared(JOB_INSERT_MANY).await?;
    let rows = client.query(&stmt, &[&ids, &queues, &payloads, &priorities, &run_ats, &max_attempts, &keys]).await?;
    let mut created = std::collections::HashMap::with_capacity(rows.len());
    let mut holders = std::collections::HashMap::new();
    for row in &rows {
        let job = job_from_row(row)?;
        if row.try_get("created")? {
            created.insert(job.id, job);
        } else if let Some(key) = job.unique_key.clone() {
            holders.insert((job.queue.clone(), key), job);
        }
    }
    Ok(ids
        .iter()
        .zip(jobs)
        .map(|(id, new)| match created.remove(id) {
            Some(job) => Some((job, true)),
            None => new
                .unique_key
                .as_ref()
                .and_then(|k| holders.get(&(new.queue.clone(), k.clone())))
                .map(|job| (job.clone(), false)),
        })
        .collect())
}

/// Inserts many jobs in one statement: all or nothing, one notification per queue.
///
/// The answer is built from the request and the transaction's `now()` ([`Inserted::into_jobs`]) rather than
/// read back with `RETURNING *`: turning every payload back into text on the server and parsing it
/// again here was a large part of a batch's cost (docs/performance.md). The ids are chosen here.
///
/// With unique keys, rows go in sorted by queue and key: two batches whose keys overlap in a different
/// order would otherwise each wait for the other's key in the unique index, a deadlock PostgreSQL
/// resolves by failing one of them. In one order the second simply finds the key taken (a unique
/// violation, a 409). Without keys there is no such lock to order, and no sort.
macro_rules! insert_batch_sql {
    ($order:literal) => {
        concat!(
            "
WITH ins AS (
    INSERT INTO jobs_active (id, queue, payload, priority, run_at, max_attempts, unique_key)
    SELECT id, q, p, pr, coalesce(ra, now()), ma, uk
    FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::timestamptz[], $6::int4[], $7::text[])
         WITH ORDINALITY AS t(id, q, p, pr, ra, ma, uk, n)
    ",
            $order,
            "
    RETURNING 1
)
SELECT now(), count(*) FROM ins"
        )
    };
}
const JOB_INSERT_BATCH: &str = insert_batch_sql!("");
const JOB_INSERT_BATCH_KEYED: &str = insert_batch_sql!("ORDER BY q, uk, n");

/// Sent with explicit parameter types (`query_typed`): one round trip, where an unprepared `query`
/// costs two (prepare, then execute) on the pooled connections of the API.
pub async fn job_insert_batch(client: &Client, jobs: &[NewJob]) -> Result<Inserted, DbError> {
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let NewJobColumns { queues, payloads, priorities, run_ats, max_attempts, keys } = NewJobColumns::of(jobs);
    let statement = if keys.iter().any(Option::is_some) { JOB_INSERT_BATCH_KEYED } else { JOB_INSERT_BATCH };
    let rows = client
        .query_typed(
            statement,
            &[
                (&ids, Type::UUID_ARRAY),
                (&queues, Type::TEXT_ARRAY),
                (&payloads, Type::JSONB_ARRAY),
                (&priorities, Type::INT4_ARRAY),
                (&run_ats, Type::TIMESTAMPTZ_ARRAY),
                (&max_attempts, Type::INT4_ARRAY),
                (&keys, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    let row = rows.first().ok_or_else(|| DbError::Decode("the batch insert returned no row".into()))?;
    let (now, inserted): (DateTime<Utc>, i64) = (row.try_get(0)?, row.try_get(1)?);
    if inserted != jobs.len() as i64 {
        return Err(DbError::Decode(format!("a batch of {} jobs inserted {inserted}", jobs.len())));
    }
    Ok(Inserted { ids, now })
}

/// What [`job_insert_batch`] wrote: the ids it gave the jobs, in order, and its transaction's `now()`.
pub struct Inserted {
    ids: Vec<Uuid>,
    now: DateTime<Utc>,
}

impl Inserted {
    /// The rows as stored, from the jobs that were inserted (the same, in the same order): the
    /// table's defaults written out, times and numbers as PostgreSQL keeps them ([`stored`]).
    pub fn into_jobs(self, jobs: Vec<NewJob>) -> Vec<Job> {
        let now = self.now;
        self.ids
            .into_iter()
            .zip(jobs)
            .map(|(id, new)| {
                let mut payload = new.payload;
                stored::json(&mut payload);
                Job {
                    id,
                    queue: new.queue,
                    payload,
                    status: JobStatus::Pending,
                    result: None,
                    error: None,
                    errors: Value::Array(Vec::new()),
                    priority: new.priority,
                    run_at: new.run_at.map_or(now, stored::time),
                    attempts: 0,
                    max_attempts: new.max_attempts,
                    unique_key: new.unique_key,
                    locked_by: None,
                    locked_until: None,
                    cancel_requested_at: None,
                    created_at: now,
                    updated_at: now,
                    started_at: None,
                    finished_at: None,
                }
            })
            .collect()
    }
}

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

/// Inserts jobs with their parents (`after`), every row in one statement, as a status computed here:
/// `waiting` with `waiting_on` parents not done yet, `pending` when all are done, `cancelled` (naming
/// the parent) when one has already failed or been cancelled.
const JOB_INSERT_GRAPH: &str = "
INSERT INTO jobs (id, queue, payload, priority, run_at, max_attempts, unique_key, status, waiting_on, error,
                  finished_at)
SELECT id, q, p, pr, coalesce(ra, now()), ma, uk, st, wo, er, CASE WHEN st = 'cancelled' THEN now() END
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::timestamptz[], $6::int4[], $7::text[],
            $8::text[], $9::int4[], $10::text[])
     WITH ORDINALITY AS t(id, q, p, pr, ra, ma, uk, st, wo, er, n)
ORDER BY q, uk, n
RETURNING *";

/// Every edge, so that the parent's completion finds its children.
const JOB_DEPENDENCY_INSERT: &str = "
INSERT INTO job_dependencies (parent, child) SELECT * FROM unnest($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING";

/// Inserts jobs that may wait for existing jobs or for earlier ones of the same call
/// ([`Parent::Earlier`], checked by the caller to point backwards), all or nothing, in one transaction.
/// Returns the jobs in the order given, or the parent ids that name no job.
///
/// The existing parents are locked (`FOR SHARE`, in id order) before their statuses are read: a
/// completion of one of them either committed before (its status is read as final here) or waits
/// for this transaction, and then finds the new edges, since the release of dependants runs after
/// the parent's row lock was taken. A parent moved to jobs_finished while this waited is a
/// serialization failure: the caller tries again.
pub async fn job_insert_graph(client: &mut Client, jobs: &[NewJob]) -> Result<Result<Vec<Job>, Vec<Uuid>>, DbError> {
    let tx = client.transaction().await?;
    let mut external: Vec<Uuid> = jobs
        .iter()
        .flat_map(|j| &j.after)
        .filter_map(|p| if let Parent::Job(id) = p { Some(*id) } else { None })
        .collect();
    external.sort_unstable();
    external.dedup();
    let rows = tx.query("SELECT id, status FROM jobs WHERE id = ANY($1) ORDER BY id FOR SHARE", &[&external]).await?;
    let mut known = HashMap::with_capacity(rows.len());
    for r in &rows {
        known.insert(r.try_get::<_, Uuid>(0)?, status_of(r, "status")?);
    }
    let unknown: Vec<Uuid> = external.iter().filter(|id| !known.contains_key(id)).copied().collect();
    if !unknown.is_empty() {
        return Ok(Err(unknown));
    }
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let (mut statuses, mut waiting_on, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let (mut parents, mut children) = (Vec::new(), Vec::new());
    for (i, job) in jobs.iter().enumerate() {
        let mut n_waiting = 0;
        let mut cause = None;
        for p in &job.after {
            let (id, status) = match *p {
                Parent::Job(id) => (id, known[&id]),
                Parent::Earlier(n) => (ids[n], JobStatus::from_stored(statuses[n]).unwrap_or(JobStatus::Waiting)),
            };
            parents.push(id);
            children.push(ids[i]);
            match status {
                JobStatus::Done => {}
                JobStatus::Failed | JobStatus::Cancelled => {
                    cause.get_or_insert(format!("parent {id} ended {}", status.as_str()));
                }
                // A new job of this batch is never done yet: it counts as waited for.
                _ => n_waiting += 1,
            }
        }
        let status = match (&cause, n_waiting) {
            (Some(_), _) => "cancelled",
            (None, 0) => "pending",
            (None, _) => "waiting",
        };
        statuses.push(status);
        waiting_on.push(if cause.is_some() { 0 } else { n_waiting });
        errors.push(cause);
    }
    let NewJobColumns { queues, payloads, priorities, run_ats, max_attempts, keys } = NewJobColumns::of(jobs);
    let rows = tx
        .query(
            JOB_INSERT_GRAPH,
            &[&ids, &queues, &payloads, &priorities, &run_ats, &max_attempts, &keys, &statuses, &waiting_on, &errors],
        )
        .await?;
    tx.execute(JOB_DEPENDENCY_INSERT, &[&parents, &children]).await?;
    let mut by_id: HashMap<Uuid, Job> =
        rows.iter().map(|r| job_from_row(r).map(|j| (j.id, j))).collect::<Result<_, _>>()?;
    let jobs = ids
        .iter()
        .map(|id| by_id.remove(id).ok_or_else(|| DbError::Decode(format!("inserted job {id} was not returned"))))
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit().await?;
    Ok(Ok(jobs))
}
