//! `GET /stats` (counts per queue and status) and `GET /stats/history` (the last 15 minutes, for the
//! dashboard's charts).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::{reply, ApiState};
use crate::db::{queries, DbError};
use crate::wait_series::{self, BUCKETS, BUCKET_SECS, WINDOW_SECS};

pub(super) async fn stats(state: &ApiState) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let queues = queries::stats(&*client).await?;
    Ok(reply(StatusCode::OK, &json!({ "queues": queues })))
}

/// One queue's last 15 minutes, oldest bucket first.
#[derive(Debug, Serialize)]
struct QueueHistory {
    queue: String,
    /// Jobs that finished (done, failed or cancelled) in each bucket, on any instance.
    finished: Vec<i64>,
    /// Of those, the failed ones.
    failed: Vec<i64>,
    /// Wait from `run_at` to claim, median and 95th percentile, over every instance's claims.
    wait_p50_secs: Vec<Option<f64>>,
    wait_p95_secs: Vec<Option<f64>>,
}

impl QueueHistory {
    fn new(queue: String) -> Self {
        QueueHistory {
            queue,
            finished: vec![0; BUCKETS],
            failed: vec![0; BUCKETS],
            wait_p50_secs: vec![None; BUCKETS],
            wait_p95_secs: vec![None; BUCKETS],
        }
    }
}

/// Finished jobs come from the table (every instance's work, through the `finished_at` index); wait
/// times from this instance's memory plus the other instances' histograms in `wait_stats` (see
/// [`crate::wait_series`]). Both are in buckets of 10 s, the newest ending now.
pub(super) async fn history(state: &ApiState) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let window = std::time::Duration::from_secs(WINDOW_SECS);
    let finished = queries::finished_history(&*client, window, std::time::Duration::from_secs(BUCKET_SECS)).await?;
    let now = wait_series::now_secs();
    let first_slot = (now / BUCKET_SECS) as i64 + 1 - BUCKETS as i64;
    let others = queries::wait_stats_others(&*client, first_slot, &state.instance.id).await?;
    drop(client);
    let mut queues: BTreeMap<String, QueueHistory> = BTreeMap::new();
    for b in finished.into_iter().filter(|b| b.ago < BUCKETS) {
        let q = queues.entry(b.queue.clone()).or_insert_with(|| QueueHistory::new(b.queue));
        q.finished[BUCKETS - 1 - b.ago] += b.finished;
        q.failed[BUCKETS - 1 - b.ago] += b.failed;
    }
    for w in wait_series::global().merged_at(now, &others) {
        let q = queues.entry(w.queue.clone()).or_insert_with(|| QueueHistory::new(w.queue));
        q.wait_p50_secs = w.p50;
        q.wait_p95_secs = w.p95;
    }
    let queues: Vec<QueueHistory> = queues.into_values().collect();
    Ok(reply(
        StatusCode::OK,
        &json!({
            "window_secs": WINDOW_SECS,
            "bucket_secs": BUCKET_SECS,
            "instance": state.instance.id,
            "queues": queues,
        }),
    ))
}
