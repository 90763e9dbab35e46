//! `GET /queues`, `POST /queues/{queue}/pause` and `POST /queues/{queue}/resume`.

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::{reply, ApiState};
use crate::db::{queues, DbError};
use crate::instances::LIVE_WITHIN;
use crate::job::QUEUE_NAME_MAX;

/// A queue name from a path segment: percent-decoded, 1 to 128 bytes of UTF-8 without NUL (the
/// `jobs_queue_valid` and `queues_name_valid` constraints).
pub(super) fn name(segment: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("invalid queue name {segment:?}: expected 1 to {QUEUE_NAME_MAX} bytes"));
    let raw = segment.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).ok_or_else(bad)?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    let name = String::from_utf8(bytes).map_err(|_| bad())?;
    if name.is_empty() || name.len() > QUEUE_NAME_MAX || name.contains('\0') {
        return Err(bad());
    }
    Ok(name)
}

pub(super) async fn list(state: &ApiState) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let queues = queues::queue_list(&*client, LIVE_WITHIN).await?;
    Ok(reply(StatusCode::OK, &json!({ "queues": queues })))
}

/// Pausing is stored in the database, so every instance and every remote claim honours it from the
/// next claim on, and it survives restarts. Jobs can still be inserted into a paused queue.
pub(super) async fn set_paused(state: &ApiState, queue: String, paused: bool) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    queues::queue_set_paused(&*client, &queue, paused).await?;
    slog::info!(state.log, "queue pause changed"; "queue" => &queue, "paused" => paused);
    Ok(reply(StatusCode::OK, &json!({ "queue": queue, "paused": paused })))
}
