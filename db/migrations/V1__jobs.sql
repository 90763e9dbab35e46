-- V1: the jobs table, its indexes and its triggers.
--
-- This file is the schema's documentation as much as its definition. It is
-- embedded in the `jobqueue` binary and applied by `jobqueue migrate` (or on
-- `jobqueue serve` start-up) inside a transaction under an advisory lock; a DBA
-- may equally apply it by hand with `psql -1 -f db/migrations/V1__jobs.sql`
-- (then V2, ...), followed by `jobqueue migrate --baseline`, which records them
-- as applied so that the service does not try to run them again.
--
-- Every column has a default that makes a bare
--     INSERT INTO jobs (payload) VALUES ('{"to": "a@example.com"}');
-- a complete, runnable job, exactly like one created through the HTTP API.

CREATE TABLE jobs (
    id                  uuid        NOT NULL DEFAULT gen_random_uuid(),
    queue               text        NOT NULL DEFAULT 'default',
    payload             jsonb       NOT NULL,
    status              text        NOT NULL DEFAULT 'pending',
    result              jsonb,
    error               text,
    errors              jsonb       NOT NULL DEFAULT '[]',
    priority            integer     NOT NULL DEFAULT 0,
    run_at              timestamptz NOT NULL DEFAULT now(),
    attempts            integer     NOT NULL DEFAULT 0,
    max_attempts        integer,
    unique_key          text,
    locked_by           text,
    locked_until        timestamptz,
    cancel_requested_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,

    CONSTRAINT jobs_pkey PRIMARY KEY (id),
    CONSTRAINT jobs_status_valid
        CHECK (status IN ('pending', 'processing', 'done', 'failed', 'cancelled')),
    CONSTRAINT jobs_queue_valid
        CHECK (length(queue) BETWEEN 1 AND 128),
    CONSTRAINT jobs_priority_range
        CHECK (priority BETWEEN -1000 AND 1000),
    -- 'infinity' would make the timer's arithmetic (run_at - now()) fail.
    CONSTRAINT jobs_run_at_finite
        CHECK (isfinite(run_at)),
    CONSTRAINT jobs_attempts_range
        CHECK (attempts >= 0),
    CONSTRAINT jobs_max_attempts_range
        CHECK (max_attempts IS NULL OR max_attempts BETWEEN 1 AND 1000),
    CONSTRAINT jobs_errors_is_array
        CHECK (jsonb_typeof(errors) = 'array'),
    CONSTRAINT jobs_unique_key_valid
        CHECK (unique_key IS NULL OR length(unique_key) BETWEEN 1 AND 255),
    -- A processing job always names its holder and its lease; the rescuer
    -- relies on locked_until to find the jobs of a dead instance.
    CONSTRAINT jobs_processing_is_locked
        CHECK (status <> 'processing' OR (locked_by IS NOT NULL AND locked_until IS NOT NULL))
);

COMMENT ON TABLE jobs IS
    'The queue itself. The table is the truth; NOTIFY on channel jobqueue is only a hint.';
COMMENT ON COLUMN jobs.priority IS
    'Lower runs first within a queue (-1000 most urgent, default 0); FIFO by run_at, id within one priority.';
COMMENT ON COLUMN jobs.run_at IS
    'The job is not claimed before this time. Retries move it forward by the backoff.';
COMMENT ON COLUMN jobs.attempts IS
    'Attempts started so far; incremented by the claim, so a job that crashed its worker still counts.';
COMMENT ON COLUMN jobs.max_attempts IS
    'NULL means the queue''s configured default; the first claim pins the effective value.';
COMMENT ON COLUMN jobs.errors IS
    'Error history: a JSON array of {attempt, at, error}, newest last, capped at 20 entries.';
COMMENT ON COLUMN jobs.unique_key IS
    'While a job with this key is pending or processing in the same queue, no second one can be inserted.';
COMMENT ON COLUMN jobs.locked_by IS
    'Instance id of the worker holding the job while it is processing; completion is fenced on it.';
COMMENT ON COLUMN jobs.locked_until IS
    'Lease expiry. The holder extends it while the handler runs; the rescuer reclaims the job after it.';
COMMENT ON COLUMN jobs.cancel_requested_at IS
    'Set by POST /jobs/{id}/cancel on a processing job; the holder stops the handler and ends the job cancelled.';

-- The claim reads this index in order: ORDER BY priority, run_at, id within
-- one queue, pending rows only. Being partial it stays as small as the
-- backlog, not the history.
CREATE INDEX jobs_claim_idx ON jobs (queue, priority, run_at, id) WHERE status = 'pending';

-- GET /jobs lists newest first and pages by keyset (created_at, id).
CREATE INDEX jobs_created_idx ON jobs (created_at DESC, id DESC);

-- The rescuer looks for expired leases among processing rows. The key is
-- deliberately not locked_until: heartbeats rewrite locked_until, and leaving
-- it out of every index keeps those updates HOT (no index writes).
CREATE INDEX jobs_processing_idx ON jobs (queue) WHERE status = 'processing';

-- Retention and the "finished in the last minute" statistic.
CREATE INDEX jobs_finished_idx ON jobs (finished_at)
    WHERE status IN ('done', 'failed', 'cancelled');

-- Unique jobs: enforced by the database, so concurrent submissions of the
-- same key from any number of instances (or psql) create one job.
CREATE UNIQUE INDEX jobs_unique_key_idx ON jobs (queue, unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing');

-- A queue table churns: every job is inserted, updated two or three times and
-- eventually deleted. fillfactor 80 leaves room on each page so that lease
-- heartbeats (which touch no indexed column) can be HOT updates. The default
-- autovacuum thresholds (20% of the table) would let dead tuples pile up for a
-- long time on a large table and slow the claim's index scan; vacuum after
-- 1% instead, and analyze often so the planner keeps using the partial indexes.
ALTER TABLE jobs SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1
);

-- updated_at is kept current by the database, whoever runs the UPDATE (the
-- service or a person in psql). The service's own statements set updated_at
-- themselves; the WHEN clause, evaluated without entering PL/pgSQL, then skips
-- the function. On the claim and completion hot path that per-row call was
-- measured at about 15% of the statement's time.
CREATE FUNCTION jobs_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_touch_updated_at
    BEFORE UPDATE ON jobs
    FOR EACH ROW
    WHEN (OLD.updated_at IS NOT DISTINCT FROM NEW.updated_at)
    EXECUTE FUNCTION jobs_touch_updated_at();

-- Wake the workers: one pg_notify per statement and distinct queue that
-- received pending rows, not one per row, and none for a zero-row insert.
--
-- Why per statement and with a constant payload: a transaction that has
-- issued NOTIFY takes a cluster-wide lock while it commits, so notifying
-- transactions serialise on each other. Keeping notifications few, and the
-- payload a constant (the queue name) lets Postgres fold duplicates within a
-- transaction, keeps bulk inserts (multi-row INSERT, INSERT ... SELECT, COPY)
-- cheap. Rows whose run_at is in the future notify too: the dispatcher uses
-- the wake-up to re-arm its timer for the earliest run_at.
CREATE FUNCTION jobs_notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT DISTINCT queue FROM inserted_jobs WHERE status = 'pending' LOOP
        PERFORM pg_notify('jobqueue', q);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS inserted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_inserted();
