//! The statements behind the dashboard: jobs finished per queue over the last minutes and the
//! instances' wait histograms (`GET /stats/history`), and the jobs list's search by unique key.

use std::time::Duration;

use tokio_postgres::GenericClient;

use super::super::DbError;
use super::{jobs_from_rows, secs};
use crate::job::Job;

/// Finished jobs per queue and bucket, bucket 0 being the newest. The status list confines the scan
/// to the `jobs_finished` partition and the range on `finished_at` to the window of its index
/// `jobs_finished_idx` (a range scan): the cost follows the jobs finished in the window, never the
/// history that retention keeps.
const FINISHED_HISTORY: &str = "
SELECT queue,
       floor(extract(epoch FROM (now() - finished_at))::float8 / $2::float8)::int4 AS ago,
       count(*) AS finished,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM jobs
WHERE status IN ('done', 'failed', 'cancelled')
  AND finished_at > now() - make_interval(secs => $1)
GROUP BY 1, 2";

/// One (queue, bucket) of [`finished_history`].
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedBucket {
    pub queue: String,
    /// How many buckets before the newest (0 is the one ending now).
    pub ago: usize,
    pub finished: i64,
    pub failed: i64,
}

/// Jobs finished within `window`, per queue and bucket of `bucket` width, counted back from now.
pub async fn finished_history(
    client: &impl GenericClient,
    window: Duration,
    bucket: Duration,
) -> Result<Vec<FinishedBucket>, DbError> {
    let rows = client.query(FINISHED_HISTORY, &[&secs(window), &secs(bucket)]).await?;
    rows.iter()
        .map(|r| {
            let ago: i32 = r.try_get("ago")?;
            Ok(FinishedBucket {
                queue: r.try_get("queue")?,
                // A row finished "in the future" (clock skew between hosts) counts as now.
                ago: ago.max(0) as usize,
                finished: r.try_get("finished")?,
                failed: r.try_get("failed")?,
            })
        })
        .collect()
}

/// The newest jobs with this unique key, in any queue and status (newest first, by their
/// time-ordered ids). Walks each partition's primary key from the newest job and stops after `limit`
/// matches; a key that matches fewer
/// jobs than that reads the whole index, bounded by the statement timeout. Keys are an operator's
/// occasional search, not a hot path, and an index of its own would cost every insert.
const JOB_FIND_BY_KEY: &str = "
SELECT * FROM jobs
WHERE unique_key = $1
ORDER BY id DESC
LIMIT $2";

pub async fn job_find_by_key(client: &impl GenericClient, key: &str, limit: i64) -> Result<Vec<Job>, DbError> {
    let rows = client.query(JOB_FIND_BY_KEY, &[&key, &limit]).await?;
    jobs_from_rows(&rows)
}

/// One instance's wait histogram of one queue and 10-second slot (see `crate::wait_series`).
#[derive(Debug, Clone, PartialEq)]
pub struct WaitStatsRow {
    pub slot: i64,
    pub queue: String,
    pub counts: Vec<i32>,
}

/// Absolute counts: writing the same bucket again (the next flush, a retry) replaces it.
const WAIT_STATS_PUT: &str = "
INSERT INTO wait_stats (slot, queue, instance, counts) VALUES ($1, $2, $3, $4)
ON CONFLICT (slot, queue, instance) DO UPDATE SET counts = EXCLUDED.counts";

pub async fn wait_stats_put(client: &impl GenericClient, instance: &str, row: &WaitStatsRow) -> Result<(), DbError> {
    client.execute(WAIT_STATS_PUT, &[&row.slot, &row.queue, &instance, &row.counts]).await?;
    Ok(())
}

/// Rows of slots before `oldest`, of any instance (a dead one's too): a range of the primary key.
pub async fn wait_stats_prune(client: &impl GenericClient, oldest: i64) -> Result<u64, DbError> {
    Ok(client.execute("DELETE FROM wait_stats WHERE slot < $1", &[&oldest]).await?)
}

/// The other instances' rows from slot `from` on.
pub async fn wait_stats_others(
    client: &impl GenericClient,
    from: i64,
    instance: &str,
) -> Result<Vec<WaitStatsRow>, DbError> {
    let rows = client
        .query("SELECT slot, queue, counts FROM wait_stats WHERE slot >= $1 AND instance <> $2", &[&from, &instance])
        .await?;
    rows.iter().map(|r| Ok(WaitStatsRow { slot: r.try_get(0)?, queue: r.try_get(1)?, counts: r.try_get(2)? })).collect()
}
