-- V8: when each attempt started, and wait times every instance can read.
--
-- jobs.started_at is written by the claim: when the job's latest attempt began. Each entry of the
-- error history ({attempt, at, error}) now also carries the started_at of the attempt that failed,
-- so a job's timeline shows every attempt's start and end. Not indexed: the claim writes it, and a
-- column in no index keeps that write free of index maintenance.
--
-- wait_stats holds each instance's histogram of claim waits (run_at to claim) per queue and
-- 10-second slot, so the dashboard's wait chart covers the claims of every instance sharing the
-- database rather than those of the one that answers. It is a statistic of the last 15 minutes, not a
-- queue: each instance rewrites its own rows every few seconds and deletes slots past the window.

-- Metadata only: a column without a default does not rewrite the table.
ALTER TABLE jobs ADD COLUMN started_at timestamptz;
COMMENT ON COLUMN jobs.started_at IS
    'When the latest attempt was claimed; NULL before the first. Each entry of errors carries its attempt''s.';

CREATE TABLE wait_stats (
    -- 10-second slot: seconds since the epoch divided by 10.
    slot     bigint  NOT NULL,
    queue    text    NOT NULL,
    instance text    NOT NULL,
    -- Claims per logarithmic bin of the wait (bin 0 under 1 ms, each next bin 1.25 times wider);
    -- see src/wait_series.rs.
    counts   integer[] NOT NULL,
    CONSTRAINT wait_stats_pkey PRIMARY KEY (slot, queue, instance)
);
COMMENT ON TABLE wait_stats IS
    'Claim waits (run_at to claim) per instance, queue and 10-second slot, as histograms: the dashboard''s wait chart.';

COMMENT ON COLUMN jobs.errors IS
    'Error history: a JSON array of {attempt, started_at, at, error}, newest last, capped at 20 entries (entries written before V8 have no started_at).';
