//! The remote-worker endpoints: `POST /queues/{queue}/claim` and
//! `POST /jobs/{id}/heartbeat|complete|fail|snooze|release`. Parsing and range checks live here; the
//! protocol itself is [`crate::remote`]. Lease tokens are never logged.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::{decode, parse_json, reply, ApiState};
use crate::config::parse_duration;
use crate::db::lease::Beat;
use crate::remote::{Claim, Ending, RemoteError};

/// Longest name a worker may give itself (it is stored in `locked_by`).
pub const WORKER_NAME_MAX: usize = 128;
/// Most jobs one claim may take.
pub const CLAIM_MAX: i64 = 1000;
/// Shortest and longest lease a claim or heartbeat may ask for.
pub const LEASE_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));
/// Longest long-poll.
pub const CLAIM_WAIT_MAX: Duration = Duration::from_secs(60);
/// Longest snooze or `retry_after`.
pub const DELAY_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest error text a worker may report.
pub const ERROR_MAX: usize = 64 * 1024;
/// A lease token is 64 hex digits; anything much longer is not one.
const TOKEN_MAX: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    worker: String,
    max: Option<i64>,
    lease: Option<String>,
    wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    lease_token: String,
    /// heartbeat
    lease: Option<String>,
    /// complete
    result: Option<Value>,
    /// fail
    error: Option<String>,
    retry: Option<bool>,
    retry_after: Option<String>,
    /// snooze
    delay: Option<String>,
}

/// A duration field within `range`, e.g. `lease: expected a duration from 1s to 1h, got "2h"`.
fn duration_field(field: &str, value: Option<&str>, range: (Duration, Duration)) -> Result<Option<Duration>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    match parse_duration(v) {
        Some(d) if d >= range.0 && d <= range.1 => Ok(Some(d)),
        _ => Err(ApiError::bad_request(format!(
            "{field}: expected a duration such as 500ms, 30s or 5m, from {} to {}, got {v:?}",
            humantime::format_duration(range.0),
            humantime::format_duration(range.1)
        ))),
    }
}

fn only(call: &str, body: &LeaseBody, allowed: &[&str]) -> Result<(), ApiError> {
    let given = [
        ("lease", body.lease.is_some()),
        ("result", body.result.is_some()),
        ("error", body.error.is_some()),
        ("retry", body.retry.is_some()),
        ("retry_after", body.retry_after.is_some()),
        ("delay", body.delay.is_some()),
    ];
    match given.iter().find(|(name, set)| *set && !allowed.contains(name)) {
        Some((name, _)) => Err(ApiError::bad_request(format!("{name}: not a field of {call}"))),
        None => Ok(()),
    }
}

pub(super) async fn claim(state: &ApiState, queue: String, body: Bytes) -> Result<Response, ApiError> {
    let b: ClaimBody = decode(parse_json(&body)?, "")?;
    if b.worker.is_empty() || b.worker.len() > WORKER_NAME_MAX || b.worker.contains('\0') {
        return Err(ApiError::bad_request(format!("worker: expected a name of 1 to {WORKER_NAME_MAX} bytes")));
    }
    let max = b.max.unwrap_or(1);
    if !(1..=CLAIM_MAX).contains(&max) {
        return Err(ApiError::bad_request(format!("max: expected a whole number from 1 to {CLAIM_MAX}, got {max}")));
    }
    let lease = duration_field("lease", b.lease.as_deref(), LEASE_RANGE)?.unwrap_or(state.remote.default_lease);
    let wait = duration_field("wait", b.wait.as_deref(), (Duration::ZERO, CLAIM_WAIT_MAX))?.unwrap_or_default();
    let c = Claim { queue, worker: b.worker, max, lease, wait };
    let jobs = state.remote.claim(&c, &state.shutdown).await.map_err(|e| remote_error(state, e))?;
    let jobs: Vec<Value> = jobs
        .into_iter()
        .map(|l| {
            let mut v = serde_json::to_value(&l.job).unwrap_or_default();
            v["lease_expires_at"] = json!(l.job.locked_until);
            v["lease_token"] = Value::String(l.lease_token);
            v
        })
        .collect();
    Ok(reply(StatusCode::OK, &json!({ "jobs": jobs })))
}

pub(super) async fn lease_call(state: &ApiState, id: Uuid, call: &str, body: Bytes) -> Result<Response, ApiError> {
    let b: LeaseBody = decode(parse_json(&body)?, "")?;
    if b.lease_token.is_empty() || b.lease_token.len() > TOKEN_MAX {
        return Err(ApiError::bad_request("lease_token: expected the token the claim returned"));
    }
    let token = b.lease_token.as_str();
    let ending = match call {
        "heartbeat" => {
            only(call, &b, &["lease"])?;
            let lease = duration_field("lease", b.lease.as_deref(), LEASE_RANGE)?.unwrap_or(state.remote.default_lease);
            return match state.remote.heartbeat(id, token, lease).await.map_err(|e| remote_error(state, e))? {
                Beat::Held { lease_expires_at, cancel_requested } => Ok(reply(
                    StatusCode::OK,
                    &json!({ "lease_expires_at": lease_expires_at, "cancel_requested": cancel_requested }),
                )),
                Beat::Cancelled(job) => Err(lost(Some(job))),
            };
        }
        "complete" => {
            only(call, &b, &["result"])?;
            let result = b.result.unwrap_or(Value::Null);
            if crate::job::contains_nul(&result) {
                return Err(ApiError::bad_request(
                    "result: must not contain \\u0000 (PostgreSQL jsonb cannot store it)",
                ));
            }
            Ending::Complete(result)
        }
        "fail" => {
            only(call, &b, &["error", "retry", "retry_after"])?;
            let error = b.error.ok_or_else(|| ApiError::bad_request("error: is required (what went wrong)"))?;
            if error.len() > ERROR_MAX {
                return Err(ApiError::bad_request(format!("error: at most {ERROR_MAX} bytes")));
            }
            let retry_after = duration_field("retry_after", b.retry_after.as_deref(), (Duration::ZERO, DELAY_MAX))?;
            Ending::Fail { error, retry: b.retry.unwrap_or(true), retry_after }
        }
        "snooze" => {
            only(call, &b, &["delay"])?;
            let delay = duration_field("delay", b.delay.as_deref(), (Duration::ZERO, DELAY_MAX))?
                .ok_or_else(|| ApiError::bad_request("delay: is required, e.g. \"10m\""))?;
            Ending::Snooze(delay)
        }
        _ => {
            only(call, &b, &[])?;
            Ending::Release
        }
    };
    let job = state.remote.finish(id, token, ending).await.map_err(|e| remote_error(state, e))?;
    Ok(reply(StatusCode::OK, &job))
}

fn lost(job: Option<Box<crate::job::Job>>) -> ApiError {
    match job {
        Some(job) => ApiError::lease_lost(
            format!("the lease ran out after cancellation was requested; the job is now {}", job.status),
            Some(*job),
        ),
        None => ApiError::lease_lost(
            "this lease token does not hold the job: its lease expired, it was cancelled or finished, or the \
             token belongs to another attempt",
            None,
        ),
    }
}

fn remote_error(state: &ApiState, e: RemoteError) -> ApiError {
    match e {
        RemoteError::LeaseLost(job) => lost(job),
        RemoteError::Busy => ApiError::busy(
            format!("{} claims are already waiting on this instance; try again", state.remote.max_long_polls),
            1,
        ),
        RemoteError::Db(e) => e.into(),
    }
}
