-- V2: jobqueue_stats, the numbers behind GET /stats, for psql users too:
--     SELECT * FROM jobqueue_stats;
--
-- Each status is read through the partial index that covers it rather than by
-- one GROUP BY over the whole table: pending and processing rows (the backlog,
-- small in a healthy system) through jobs_claim_idx and jobs_processing_idx,
-- and "finished in the last minute" as a range scan of jobs_finished_idx. The
-- finished totals read jobs_finished_idx too while finished rows are a
-- minority; when they are most of the table the planner rightly prefers a
-- sequential scan. Either way the cost follows the backlog plus the finished
-- history that retention keeps. docs/architecture.md shows the query plan.
CREATE VIEW jobqueue_stats AS
-- Each aggregate's WHERE matches exactly one partial index predicate, so the
-- planner can read that index instead of the table.
WITH pending AS (
    SELECT queue, count(*) AS n,
           min(run_at) FILTER (WHERE run_at <= now()) AS oldest_runnable
    FROM jobs WHERE status = 'pending' GROUP BY queue
), processing AS (
    SELECT queue, count(*) AS n
    FROM jobs WHERE status = 'processing' GROUP BY queue
), finished AS (
    SELECT queue,
           count(*) FILTER (WHERE status = 'done')      AS done,
           count(*) FILTER (WHERE status = 'failed')    AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled
    FROM jobs WHERE status IN ('done', 'failed', 'cancelled') GROUP BY queue
), recent AS (
    SELECT queue, count(*) AS n
    FROM jobs
    WHERE status IN ('done', 'failed', 'cancelled') AND finished_at > now() - interval '1 minute'
    GROUP BY queue
), queues AS (
    SELECT queue FROM pending UNION SELECT queue FROM processing UNION SELECT queue FROM finished
)
SELECT q.queue,
       coalesce(p.n, 0)            AS pending,
       coalesce(r.n, 0)            AS processing,
       coalesce(f.done, 0)         AS done,
       coalesce(f.failed, 0)       AS failed,
       coalesce(f.cancelled, 0)    AS cancelled,
       coalesce(extract(epoch FROM now() - p.oldest_runnable), 0)::float8 AS oldest_pending_age_secs,
       coalesce(m.n, 0)            AS finished_last_minute
FROM queues q
LEFT JOIN pending p ON p.queue = q.queue
LEFT JOIN processing r ON r.queue = q.queue
LEFT JOIN finished f ON f.queue = q.queue
LEFT JOIN recent m ON m.queue = q.queue;

COMMENT ON VIEW jobqueue_stats IS
    'Per queue: jobs per status, age in seconds of the oldest runnable pending job, jobs finished in the last minute.';
