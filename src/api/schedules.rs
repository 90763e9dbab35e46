//! The schedule endpoints: `PUT`, `GET` and `DELETE /schedules/{name}`, `GET /schedules`, and
//! `POST /schedules/{name}/pause|resume|trigger`. The statements are in `db::schedules`; the cron
//! arithmetic is `schedule::Timetable`.

use bytes::Bytes;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::{decode, parse_json, reply, ApiState};
use crate::config::DEFAULT_QUEUE;
use crate::db::schedules::{self as sql, Schedule};
use crate::db::{queries, DbError};
use crate::job::FieldError;
use crate::schedule::{check_name, Missed, ScheduleSpec, Timetable, UPCOMING};

/// Recent jobs shown by `GET /schedules/{name}`.
const RECENT_JOBS: i64 = 10;

/// A schedule as `PUT /schedules/{name}` accepts it.
#[derive(Debug, Deserialize)]
struct ScheduleBody {
    cron: Option<String>,
    timezone: Option<String>,
    queue: Option<String>,
    payload: Option<Value>,
    priority: Option<i32>,
    max_attempts: Option<i32>,
    missed: Option<String>,
    paused: Option<bool>,
}

/// The name from the path, checked as the `schedules_name_valid` constraint checks it.
pub(super) fn name(segment: &str) -> Result<String, ApiError> {
    check_name(segment)
        .map_err(|e| ApiError::bad_request(format!("invalid schedule name {segment:?}: {}", e.message)))?;
    Ok(segment.to_string())
}

/// The schedule with its next run times (none while paused or invalid).
fn with_upcoming(s: &Schedule) -> Value {
    let upcoming = match (s.paused, Timetable::parse(&s.cron, &s.timezone)) {
        (false, Ok(t)) => t.upcoming(Utc::now(), UPCOMING),
        _ => Vec::new(),
    };
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["next_runs"] = json!(upcoming);
    v
}

fn missing(name: &str) -> ApiError {
    ApiError::not_found(format!("no schedule named {name:?}"))
}

pub(super) async fn put(state: &ApiState, name: String, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_json(&body)?;
    let invalid = |field: &str, message: &str| ApiError::invalid_field(FieldError::new(field, message));
    // Seen before decoding: an Option reads an explicit null as absent.
    if body.get("payload").is_some_and(Value::is_null) {
        return Err(invalid("payload", "any JSON value except null (or leave it out for {})"));
    }
    let b: ScheduleBody = decode(body, "")?;
    let missed = match b.missed.as_deref() {
        None => Missed::default(),
        Some(m) => Missed::parse(m).ok_or_else(|| invalid("missed", "expected skip, once or all"))?,
    };
    let payload = match b.payload {
        None => json!({}),
        Some(p) => p,
    };
    let spec = ScheduleSpec {
        name,
        cron: b.cron.ok_or_else(|| invalid("cron", "is required, e.g. \"0 2 * * *\""))?,
        timezone: b.timezone.unwrap_or_else(|| "UTC".to_string()),
        queue: b.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
        payload,
        priority: b.priority.unwrap_or(0),
        max_attempts: b.max_attempts,
        missed,
    };
    let table = spec.validate().map_err(ApiError::invalid_field)?;
    let mut client = state.pool.get().await.map_err(DbError::from)?;
    let (schedule, created) = sql::schedule_put(&mut client, &spec, b.paused, table.next_after(Utc::now())).await?;
    slog::info!(state.log, "schedule written"; "schedule" => &schedule.name, "created" => created);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(reply(status, &with_upcoming(&schedule)))
}

pub(super) async fn get(state: &ApiState, name: String) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let schedule = sql::schedule_get(&*client, &name).await?.ok_or_else(|| missing(&name))?;
    let recent = sql::schedule_runs_recent(&*client, &name, RECENT_JOBS).await?;
    let mut v = with_upcoming(&schedule);
    v["recent_jobs"] = json!(recent);
    Ok(reply(StatusCode::OK, &v))
}

pub(super) async fn list(state: &ApiState) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let schedules = sql::schedule_list(&*client).await?;
    Ok(reply(StatusCode::OK, &json!({ "schedules": schedules })))
}

pub(super) async fn delete(state: &ApiState, name: String) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    if !sql::schedule_delete(&*client, &name).await? {
        return Err(missing(&name));
    }
    slog::info!(state.log, "schedule deleted"; "schedule" => &name);
    Ok(reply(StatusCode::OK, &json!({ "name": name, "deleted": true })))
}

pub(super) async fn set_paused(state: &ApiState, name: String, paused: bool) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let schedule = sql::schedule_set_paused(&*client, &name, paused).await?.ok_or_else(|| missing(&name))?;
    slog::info!(state.log, "schedule pause changed"; "schedule" => &name, "paused" => paused);
    Ok(reply(StatusCode::OK, &with_upcoming(&schedule)))
}

/// Runs the schedule's job now, once; the schedule's own ticks go on unchanged. Answers with the job.
pub(super) async fn trigger(state: &ApiState, name: String) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let id = sql::schedule_run_now(&*client, &name).await?.ok_or_else(|| missing(&name))?;
    let job = queries::job_get(&*client, id).await?.ok_or_else(|| ApiError::internal(format!("job {id} vanished")))?;
    crate::metrics::job_inserted(&job.queue, 1);
    Ok(super::jobs::created(&job))
}
