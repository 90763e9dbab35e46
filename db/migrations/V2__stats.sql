-- V2: jobqueue_stats, the numbers behind GET /stats, for psql users too:
--     SELECT * FROM jobqueue_stats;
--
-- Each status is read through the partial index that covers it rather than by
-- one GROUP BY over the whole table: pending and processing rows (the backlog,
-- small in a healthy system) through jobs_claim_idx and jobs_processing_idx,
-- finished rows through jobs_finished_idx. The cost is therefore proportional
-- to the backlog plus the finished history kept by retention, and "finished in
-- the last minute" is a range scan of jobs_finished_idx. docs/architecture.md
-- shows the query plan.
CREATE VIEW jobqueue_stats AS
WITH active AS (
    SELECT queue,
           count(*) FILTER (WHERE status = 'pending')    AS pending,
           count(*) FILTER (WHERE status = 'processing') AS processing,
           min(run_at) FILTER (WHERE status = 'pending' AND run_at <= now()) AS oldest_runnable
    FROM jobs
    WHERE status IN ('pending', 'processing')
    GROUP BY queue
), finished AS (
    SELECT queue,
           count(*) FILTER (WHERE status = 'done')      AS done,
           count(*) FILTER (WHERE status = 'failed')    AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE finished_at > now() - interval '1 minute') AS finished_last_minute
    FROM jobs
    WHERE status IN ('done', 'failed', 'cancelled')
    GROUP BY queue
)
SELECT coalesce(a.queue, f.queue)             AS queue,
       coalesce(a.pending, 0)                 AS pending,
       coalesce(a.processing, 0)              AS processing,
       coalesce(f.done, 0)                    AS done,
       coalesce(f.failed, 0)                  AS failed,
       coalesce(f.cancelled, 0)               AS cancelled,
       coalesce(extract(epoch FROM now() - a.oldest_runnable), 0)::float8 AS oldest_pending_age_secs,
       coalesce(f.finished_last_minute, 0)    AS finished_last_minute
FROM active a
FULL JOIN finished f ON f.queue = a.queue;

COMMENT ON VIEW jobqueue_stats IS
    'Per queue: jobs per status, age in seconds of the oldest runnable pending job, jobs finished in the last minute.';
