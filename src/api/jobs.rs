//! The job endpoints: create (one or a batch), read (optionally waiting until it finishes), list,
//! cancel and retry.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;

use super::error::ApiError;
use super::{decode, parse_json, reply, within, ApiState, Request, MAX_BATCH, MAX_LIMIT, MAX_WAIT};
use crate::config::{parse_duration, DEFAULT_QUEUE};
use crate::db::queries;
use crate::job::{FieldError, Job, JobStatus, NewJob, Parent, MAX_PARENTS};

/// One job as `POST /jobs` and `POST /jobs/batch` accept it.
#[derive(Debug, Deserialize)]
struct JobSpec {
    payload: Option<Value>,
    /// The older Go service's name for the payload.
    description: Option<Value>,
    queue: Option<String>,
    priority: Option<i32>,
    run_at: Option<DateTime<Utc>>,
    delay: Option<String>,
    max_attempts: Option<i32>,
    unique_key: Option<String>,
    /// Parents: job ids, or `"$n"` for an earlier element of the same batch.
    after: Option<Vec<String>>,
}

/// Parses `after`: at most [`MAX_PARENTS`] entries, each a job id or `$n`; duplicates are dropped.
fn parse_after(after: Option<Vec<String>>) -> Result<Vec<Parent>, FieldError> {
    let after = after.unwrap_or_default();
    if after.len() > MAX_PARENTS {
        return Err(FieldError::new("after", format!("lists {} jobs; at most {MAX_PARENTS}", after.len())));
    }
    let mut parents = Vec::with_capacity(after.len());
    for a in &after {
        let parent = match a.strip_prefix('$') {
            Some(n) => Parent::Earlier(n.parse().map_err(|_| {
                FieldError::new(
                    "after",
                    format!("{a:?}: expected a job id or $n, the index of an earlier batch element"),
                )
            })?),
            None => {
                Parent::Job(a.parse().map_err(|_| FieldError::new("after", format!("{a:?}: expected a job id or $n")))?)
            }
        };
        if !parents.contains(&parent) {
            parents.push(parent);
        }
    }
    Ok(parents)
}

impl JobSpec {
    fn into_new_job(self) -> Result<NewJob, FieldError> {
        let payload = match (self.payload, self.description) {
            (Some(p), _) => p,
            (None, Some(d)) => d,
            (None, None) => return Err(FieldError::new("payload", "is required (any JSON value except null)")),
        };
        let run_at = match (self.run_at, self.delay) {
            (Some(_), Some(_)) => return Err(FieldError::new("delay", "give run_at or delay, not both")),
            (Some(at), None) => Some(at),
            (None, Some(d)) => {
                let d = parse_duration(&d)
                    .ok_or_else(|| FieldError::new("delay", "expected a duration such as 500ms, 30s or 5m"))?;
                let too_long = || FieldError::new("delay", "is too long");
                let d = chrono::Duration::from_std(d).map_err(|_| too_long())?;
                let at = Utc::now().checked_add_signed(d).ok_or_else(too_long)?;
                if !crate::job::representable(at) {
                    return Err(too_long());
                }
                Some(at)
            }
            (None, None) => None,
        };
        let job = NewJob {
            queue: self.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
            payload,
            priority: self.priority.unwrap_or(0),
            run_at,
            max_attempts: self.max_attempts,
            unique_key: self.unique_key,
            after: parse_after(self.after)?,
        };
        job.validate()?;
        Ok(job)
    }
}

/// Inserts jobs that wait for others (see [`queries::job_insert_graph`]); unknown parents are a 400.
async fn insert_graph(state: &ApiState, jobs: Vec<NewJob>) -> Result<Vec<Job>, ApiError> {
    let mut client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let mut tries = 0;
    let outcome = loop {
        // Locking a parent that a concurrent completion has just moved to jobs_finished is a
        // serialization failure; the next try finds it finished.
        match queries::job_insert_graph(&mut client, &jobs).await {
            Err(e) if e.class() == crate::db::ErrorClass::Transient && tries < 5 => tries += 1,
            other => break other?,
        }
    };
    outcome.map_err(|unknown| {
        let ids: Vec<String> = unknown.iter().map(Uuid::to_string).collect();
        ApiError::bad_request(format!("after: no job has the id {}", ids.join(", ")))
    })
}

pub(super) fn created(job: &Job) -> Response {
    let mut resp = reply(StatusCode::CREATED, job);
    if let Ok(loc) = HeaderValue::from_str(&format!("/jobs/{}", job.id)) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

pub(super) async fn create(state: &ApiState, req: &Request, body: Bytes) -> Result<Response, ApiError> {
    let spec: JobSpec = decode(parse_json(&body)?, "")?;
    let mut job = spec.into_new_job().map_err(ApiError::invalid_field)?;
    if let Some(key) = req.headers.get("idempotency-key") {
        let key = key.to_str().map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?;
        match &job.unique_key {
            Some(k) if k != key => {
                return Err(ApiError::bad_request("Idempotency-Key and unique_key differ; give one of them"))
            }
            _ => job.unique_key = Some(key.to_string()),
        }
        job.validate().map_err(ApiError::invalid_field)?;
    }
    if !job.after.is_empty() {
        if job.after.iter().any(|p| matches!(p, Parent::Earlier(_))) {
            return Err(ApiError::bad_request("after: $n names an element of a batch; use POST /jobs/batch"));
        }
        let job = insert_graph(state, vec![job]).await?.remove(0);
        crate::metrics::job_inserted(&job.queue, 1);
        return Ok(created(&job));
    }
    let (job, is_new) = state.enqueuer.insert(job).await?;
    if is_new {
        crate::metrics::job_inserted(&job.queue, 1);
    }
    Ok(if is_new { created(&job) } else { reply(StatusCode::OK, &job) })
}

pub(super) async fn create_batch(state: &ApiState, body: Bytes) -> Result<Response, ApiError> {
    let items = match parse_json(&body)? {
        Value::Array(items) => items,
        Value::Object(mut o) if o.get("jobs").is_some_and(Value::is_array) => match o.remove("jobs") {
            Some(Value::Array(items)) => items,
            _ => unreachable!("checked to be an array"),
        },
        _ => return Err(ApiError::bad_request("expected a JSON array of jobs (or {\"jobs\": [...]})")),
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!("a batch holds 1 to {MAX_BATCH} jobs, got {}", items.len())));
    }
    let mut jobs = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let spec: JobSpec = decode(item, &format!("[{i}]"))?;
        let job = spec.into_new_job().map_err(|e| ApiError::bad_request(format!("[{i}].{e}")))?;
        jobs.push(job);
    }
    for (i, job) in jobs.iter().enumerate() {
        if let Some(Parent::Earlier(n)) = job.after.iter().find(|p| matches!(p, Parent::Earlier(n) if *n >= i)) {
            return Err(ApiError::bad_request(format!(
                "[{i}].after: ${n} is not an earlier element; a job can wait only for jobs before it, so no cycle can form"
            )));
        }
    }
    if jobs.iter().any(|j| !j.after.is_empty()) {
        let jobs = insert_graph(state, jobs).await?;
        for chunk in jobs.chunk_by(|a, b| a.queue == b.queue) {
            crate::metrics::job_inserted(&chunk[0].queue, chunk.len() as u64);
        }
        return Ok(reply(StatusCode::CREATED, &jobs));
    }
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    // One statement, its own transaction: safe to run again if the server aborted it to break a
    // deadlock with a concurrent statement.
    let jobs = crate::db::retry_transient(|| queries::job_insert_batch(&client, &jobs)).await?.into_jobs(jobs);
    // One counter update per run of jobs of one queue (a batch is mostly one queue).
    for chunk in jobs.chunk_by(|a, b| a.queue == b.queue) {
        crate::metrics::job_inserted(&chunk[0].queue, chunk.len() as u64);
    }
    Ok(reply(StatusCode::CREATED, &jobs))
}

pub(super) async fn get(state: &ApiState, req: &Request, id: Uuid) -> Result<Response, ApiError> {
    let wait = match req.param("wait")? {
        None => Duration::ZERO,
        Some(w) => match parse_duration(&w) {
            Some(d) if d <= MAX_WAIT => d,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "wait={w:?}: expected a duration such as 500ms or 30s, at most {}",
                    humantime::format_duration(MAX_WAIT)
                )))
            }
        },
    };
    // Register before reading, so a job finishing in between still wakes us.
    let wait_for = match wait.is_zero() {
        true => None,
        false => Some(state.waiters.register(id).ok_or_else(|| {
            ApiError::unavailable("too many requests are waiting for jobs; try again later").retry_after(1)
        })?),
    };
    let job = fetch(state, id).await?;
    let job = match wait_for {
        Some(mut w) if !job.status.is_finished() => {
            tokio::select! {
                _ = &mut w.finished => {}
                _ = tokio::time::sleep(wait) => {}
                _ = state.shutdown.cancelled() => {}
            }
            fetch(state, id).await?
        }
        _ => job,
    };
    let (after, waiting_dependants) = within(state, async {
        let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
        Ok(queries::job_dependencies_of(&*client, id).await?)
    })
    .await?;
    Ok(reply(StatusCode::OK, &JobDetail { job: &job, after, waiting_dependants }))
}

/// A job as `GET /jobs/{id}` shows it: every field of [`Job`], plus its parents and how many jobs
/// still wait for it, each only when there is something to show: a job outside any workflow reads
/// exactly as before.
#[derive(serde::Serialize)]
struct JobDetail<'a> {
    #[serde(flatten)]
    job: &'a Job,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    after: Vec<Uuid>,
    #[serde(skip_serializing_if = "is_zero")]
    waiting_dependants: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

async fn fetch(state: &ApiState, id: Uuid) -> Result<Job, ApiError> {
    within(state, async {
        let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
        queries::job_get(&*client, id).await?.ok_or_else(|| ApiError::not_found(format!("no job with id {id}")))
    })
    .await
}

pub(super) async fn list(state: &ApiState, req: &Request) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let filter = list_filter(req, 10, false)?;
    let jobs = queries::job_list(&*client, &filter).await?;
    Ok(reply(StatusCode::OK, &jobs))
}

/// The filters of `GET /jobs` from the query string (`limit` defaulting to `default_limit`), each
/// checked with a message that names it; `before` is a job id (ids order the list). The
/// dashboard's jobs list reads the same parameters through this, with `empty_is_absent` (its form
/// sends `status=` for "any status"); the API keeps an empty value an error.
pub(crate) fn list_filter(
    req: &Request,
    default_limit: i64,
    empty_is_absent: bool,
) -> Result<queries::ListFilter, ApiError> {
    let param = |name: &str| -> Result<Option<String>, ApiError> {
        Ok(req.param(name)?.filter(|v| !(empty_is_absent && v.is_empty())))
    };
    let limit = match param("limit")? {
        None => default_limit,
        Some(l) => l.parse::<i64>().ok().filter(|l| (1..=MAX_LIMIT).contains(l)).ok_or_else(|| {
            ApiError::bad_request(format!("limit={l:?}: expected a whole number from 1 to {MAX_LIMIT}"))
        })?,
    };
    let offset = match param("offset")? {
        None => 0,
        Some(o) => o
            .parse::<i64>()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| ApiError::bad_request(format!("offset={o:?}: expected a whole number, 0 or more")))?,
    };
    let status = match param("status")? {
        None => None,
        Some(s) => Some(JobStatus::parse(&s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status={s:?}: expected waiting, pending, processing, done, failed or cancelled (or todo, in_progress)"
            ))
        })?),
    };
    let before = match param("before")? {
        None => None,
        Some(b) => {
            // Ids order the list, so the job itself need not exist any more (retention may have
            // deleted it between two pages).
            Some(
                Uuid::parse_str(&b)
                    .map_err(|_| ApiError::bad_request(format!("before={b:?}: expected the id of a job")))?,
            )
        }
    };
    Ok(queries::ListFilter { status, queue: param("queue")?, before, limit, offset })
}

pub(super) async fn cancel(state: &ApiState, id: Uuid) -> Result<Response, ApiError> {
    let mut client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    match queries::job_cancel(&mut client, id).await? {
        queries::Cancel::Cancelled(job) => Ok(reply(StatusCode::OK, &job)),
        queries::Cancel::Requested(job) => Ok(reply(StatusCode::ACCEPTED, &job)),
        queries::Cancel::Finished(job) => {
            Err(ApiError::conflict(format!("job is already {}; nothing to cancel", job.status), Some(job)))
        }
        queries::Cancel::NotFound => Err(ApiError::not_found(format!("no job with id {id}"))),
    }
}

pub(super) async fn retry(state: &ApiState, id: Uuid) -> Result<Response, ApiError> {
    let mut client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    match queries::job_retry(&mut client, id).await? {
        queries::Retry::Retried(job) => Ok(reply(StatusCode::OK, &job)),
        queries::Retry::Refused(job) => Err(ApiError::conflict(
            format!("job is {}; only failed or cancelled jobs can be retried", job.status),
            Some(job),
        )),
        queries::Retry::NotFound => Err(ApiError::not_found(format!("no job with id {id}"))),
    }
}
