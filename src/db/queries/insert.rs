//! Inserting jobs: one (`POST /jobs`), the coalesced single inserts of many requests, a batch, and
//! jobs that wait for others (`after`). Each statement wakes the workers through the insert trigger.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::Client;
use uuid::Uuid;

use super::super::{stored, Conn, DbError};
use std::collections::HashMap;

use super::{job_from_row, status_of};
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
