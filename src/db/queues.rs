//! Queues as objects (pause and resume, `GET /queues`) and the registry of running instances.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::GenericClient;

use super::queries::secs;
use super::DbError;

/// Pauses or resumes `queue` through `jobqueue_pause` / `jobqueue_resume` (db/migrations/V5__sql_api.sql),
/// the functions psql users call. Resuming announces the queue, so that idle workers everywhere
/// (producers and remote long-polls) claim its backlog at once instead of at their next poll.
pub async fn queue_set_paused(client: &impl GenericClient, queue: &str, paused: bool) -> Result<(), DbError> {
    let sql = if paused { "SELECT jobqueue_pause($1)" } else { "SELECT jobqueue_resume($1)" };
    client.execute(sql, &[&queue]).await?;
    Ok(())
}

/// One queue as `GET /queues` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    pub queue: String,
    pub paused: bool,
    pub pending: i64,
    pub processing: i64,
    pub done: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Seconds since the oldest runnable pending job became runnable; 0 when none waits.
    pub oldest_pending_age_secs: f64,
    /// Live instances that run a handler for this queue.
    pub instances: Vec<String>,
}

/// Every queue that has jobs, has a row in `queues`, or is served by a live instance. The counts come
/// from the `jobqueue_stats` view (read once: it is the expensive part); an instance is live if it
/// refreshed its row within `live_within`.
const QUEUE_LIST: &str = "
WITH stats AS MATERIALIZED (
    SELECT * FROM jobqueue_stats
), live AS (
    SELECT id, queues FROM instances WHERE heartbeat_at > now() - make_interval(secs => $1)
), names AS (
    SELECT queue AS name FROM stats
    UNION SELECT name FROM queues
    UNION SELECT unnest(queues) FROM live
)
SELECT n.name AS queue,
       coalesce(q.paused, false) AS paused,
       coalesce(s.pending, 0) AS pending,
       coalesce(s.processing, 0) AS processing,
       coalesce(s.done, 0) AS done,
       coalesce(s.failed, 0) AS failed,
       coalesce(s.cancelled, 0) AS cancelled,
       coalesce(s.oldest_pending_age_secs, 0) AS oldest_pending_age_secs,
       ARRAY(SELECT l.id FROM live l WHERE n.name = ANY(l.queues) ORDER BY l.id) AS instances
FROM names n
LEFT JOIN stats s ON s.queue = n.name
LEFT JOIN queues q ON q.name = n.name
ORDER BY n.name";

pub async fn queue_list(client: &impl GenericClient, live_within: Duration) -> Result<Vec<QueueInfo>, DbError> {
    let rows = client.query(QUEUE_LIST, &[&secs(live_within)]).await?;
    rows.iter()
        .map(|r| {
            Ok(QueueInfo {
                queue: r.try_get("queue")?,
                paused: r.try_get("paused")?,
                pending: r.try_get("pending")?,
                processing: r.try_get("processing")?,
                done: r.try_get("done")?,
                failed: r.try_get("failed")?,
                cancelled: r.try_get("cancelled")?,
                oldest_pending_age_secs: r.try_get("oldest_pending_age_secs")?,
                instances: r.try_get("instances")?,
            })
        })
        .collect()
}

/// Registers this instance, or refreshes its heartbeat (re-creating the row if someone deleted it as
/// dead, e.g. after a long pause of this process).
pub async fn instance_heartbeat(client: &impl GenericClient, id: &str, queues: &[String]) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO instances (id, queues) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET queues = EXCLUDED.queues, heartbeat_at = now()",
            &[&id, &queues],
        )
        .await?;
    Ok(())
}

/// Deletes the rows of instances that have not refreshed within `older_than` (they died).
pub async fn instance_prune(client: &impl GenericClient, older_than: Duration) -> Result<u64, DbError> {
    Ok(client
        .execute("DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1)", &[&secs(older_than)])
        .await?)
}

/// Removes this instance on a clean shutdown.
pub async fn instance_remove(client: &impl GenericClient, id: &str) -> Result<(), DbError> {
    client.execute("DELETE FROM instances WHERE id = $1", &[&id]).await?;
    Ok(())
}
