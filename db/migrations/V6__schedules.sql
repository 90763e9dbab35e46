-- V6: cron schedules. One row per schedule; every instance runs the scheduler, which inserts a job for
-- each due tick and advances next_run_at in the same transaction (rows taken FOR UPDATE SKIP LOCKED),
-- so each tick creates exactly one job however many instances run.
--
-- The cron arithmetic (croner, with chrono-tz for the time zones and their daylight saving rules)
-- lives in the service, not in SQL. So the rule for writers is:
--
--     next_run_at IS NULL means "compute me".
--
-- A psql INSERT leaves it NULL (or gives it), and an UPDATE of cron or timezone resets it to NULL
-- (trigger below); every write to the table sends NOTIFY jobqueue_schedules, and a scheduler fills the
-- value in at once: the next tick after now. An expression or time zone the service cannot use is
-- recorded in `invalid` instead, and the schedule does not run until it is changed.
--
--     INSERT INTO schedules (name, cron, queue, payload) VALUES ('nightly-report', '0 2 * * *', 'reports', '{}');
--     UPDATE schedules SET cron = '30 2 * * *', timezone = 'Europe/Berlin' WHERE name = 'nightly-report';
--     UPDATE schedules SET paused = true WHERE name = 'nightly-report';
--     SELECT jobqueue_schedule('cleanup', '*/5 * * * *', 'default', '{"older_than": "7d"}');
--     SELECT jobqueue_schedule_run('nightly-report');   -- run now, once; next_run_at unchanged
--
-- Forward-only, like every migration: earlier files are never edited.

CREATE TABLE schedules (
    name         text        NOT NULL,
    cron         text        NOT NULL,
    timezone     text        NOT NULL DEFAULT 'UTC',
    queue        text        NOT NULL DEFAULT 'default',
    payload      jsonb       NOT NULL DEFAULT '{}',
    priority     integer     NOT NULL DEFAULT 0,
    max_attempts integer,
    missed       text        NOT NULL DEFAULT 'skip',
    paused       boolean     NOT NULL DEFAULT false,
    next_run_at  timestamptz,
    last_run_at  timestamptz,
    last_job_id  uuid,
    invalid      text,
    source       text        NOT NULL DEFAULT 'sql',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT schedules_pkey PRIMARY KEY (name),
    -- Names appear in URL paths (/schedules/{name}) and in the jobs' unique keys: plain characters only.
    CONSTRAINT schedules_name_valid CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
    CONSTRAINT schedules_queue_valid CHECK (length(queue) BETWEEN 1 AND 128),
    CONSTRAINT schedules_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT schedules_max_attempts_range
        CHECK (max_attempts IS NULL OR max_attempts BETWEEN 1 AND 1000),
    CONSTRAINT schedules_missed_valid CHECK (missed IN ('skip', 'once', 'all')),
    CONSTRAINT schedules_source_valid CHECK (source IN ('api', 'sql', 'config')),
    CONSTRAINT schedules_next_run_at_finite CHECK (next_run_at IS NULL OR isfinite(next_run_at))
);

COMMENT ON TABLE schedules IS
    'Cron schedules. Each due tick inserts one job from the template (queue, payload, priority, max_attempts).';
COMMENT ON COLUMN schedules.cron IS
    'Five fields (minute hour day-of-month month day-of-week), or six with seconds first, or @hourly, @daily, @weekly, @monthly, @yearly.';
COMMENT ON COLUMN schedules.timezone IS
    'IANA time zone the cron fields are read in. A local time skipped by a DST change runs once at the next valid instant; a repeated one runs once.';
COMMENT ON COLUMN schedules.missed IS
    'Ticks more than 30 s late (instances were down): skip = none, once = one catch-up job, all = each of them (at most the latest 100).';
COMMENT ON COLUMN schedules.next_run_at IS
    'The next tick to run. NULL means "compute me": a scheduler fills it in (next tick after now), woken by NOTIFY jobqueue_schedules.';
COMMENT ON COLUMN schedules.invalid IS
    'Why the service cannot compute next_run_at (a bad cron expression or time zone written in SQL); cleared when cron or timezone change.';
COMMENT ON COLUMN schedules.source IS
    'Who wrote the definition last: api, sql or config. A config file never overwrites a schedule written through the API or SQL.';

-- The scheduler's timer and its due query: the earliest next_run_at of running schedules.
CREATE INDEX schedules_due_idx ON schedules (next_run_at) WHERE NOT paused;

-- One row per job a schedule created: the exactly-once guard of a tick (its primary key survives the
-- job's completion, unlike the jobs' unique key, which only holds while a job is live), and the
-- "recent jobs" of GET /schedules/{name}. The scheduler keeps the latest 100 per schedule. job_id has
-- no foreign key: retention deletes finished jobs, and their runs stay as history.
CREATE TABLE schedule_runs (
    schedule   text        NOT NULL REFERENCES schedules (name) ON DELETE CASCADE ON UPDATE CASCADE,
    tick       timestamptz NOT NULL,
    job_id     uuid        NOT NULL,
    -- A run asked for with POST /schedules/{name}/trigger or jobqueue_schedule_run(), not a tick.
    manual     boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedule_runs_pkey PRIMARY KEY (schedule, tick)
);

COMMENT ON TABLE schedule_runs IS 'Jobs created by schedules, one per tick (or manual run): the latest 100 of each.';

-- A changed cron or timezone invalidates next_run_at (unless the same statement sets it: the API
-- computes it itself); resuming a paused schedule does too, so ticks that fell in the pause are not
-- caught up. updated_at follows every change.
CREATE FUNCTION schedules_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.cron, NEW.timezone) IS DISTINCT FROM (OLD.cron, OLD.timezone) THEN
        NEW.invalid := NULL;
        IF NEW.next_run_at IS NOT DISTINCT FROM OLD.next_run_at THEN
            NEW.next_run_at := NULL;
        END IF;
    END IF;
    IF OLD.paused AND NOT NEW.paused AND NEW.next_run_at IS NOT DISTINCT FROM OLD.next_run_at THEN
        NEW.next_run_at := NULL;
    END IF;
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER schedules_before_update
    BEFORE UPDATE ON schedules
    FOR EACH ROW EXECUTE FUNCTION schedules_before_update();

-- Every change re-arms the schedulers' timers everywhere: one constant notification per statement,
-- which PostgreSQL folds within a transaction.
CREATE FUNCTION schedules_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobqueue_schedules', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER schedules_notify
    AFTER INSERT OR UPDATE OR DELETE ON schedules
    FOR EACH STATEMENT EXECUTE FUNCTION schedules_notify();

-- Creates or replaces a schedule, as PUT /schedules/{name} does. next_run_at NULL lets a scheduler
-- compute it (the API passes the value it computed). A replacement that keeps cron and timezone keeps
-- the pending next_run_at, so a tick due right now is not lost; paused NULL keeps the schedule's state
-- (false for a new one). Returns the row.
--     SELECT * FROM jobqueue_schedule('nightly-report', '0 2 * * *', 'reports', '{}', timezone => 'Europe/Berlin');
CREATE FUNCTION jobqueue_schedule(
    name text,
    cron text,
    queue text DEFAULT 'default',
    payload jsonb DEFAULT '{}',
    timezone text DEFAULT 'UTC',
    priority integer DEFAULT 0,
    max_attempts integer DEFAULT NULL,
    missed text DEFAULT 'skip',
    paused boolean DEFAULT NULL,
    next_run_at timestamptz DEFAULT NULL,
    source text DEFAULT 'sql'
) RETURNS schedules
LANGUAGE sql AS $$
    INSERT INTO schedules AS s
        (name, cron, queue, payload, timezone, priority, max_attempts, missed, paused, next_run_at, source)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, coalesce($9, false), $10, $11)
    ON CONFLICT ON CONSTRAINT schedules_pkey DO UPDATE
    SET cron = EXCLUDED.cron, queue = EXCLUDED.queue, payload = EXCLUDED.payload,
        timezone = EXCLUDED.timezone, priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts,
        missed = EXCLUDED.missed, paused = coalesce($9, s.paused), source = EXCLUDED.source,
        invalid = NULL,
        next_run_at = CASE
            WHEN (s.cron, s.timezone) IS NOT DISTINCT FROM (EXCLUDED.cron, EXCLUDED.timezone)
                 AND s.next_run_at IS NOT NULL AND NOT (s.paused AND NOT coalesce($9, s.paused))
            THEN s.next_run_at
            ELSE EXCLUDED.next_run_at END,
        updated_at = now()
    RETURNING *;
$$;

COMMENT ON FUNCTION jobqueue_schedule(text, text, text, jsonb, text, integer, integer, text, boolean, timestamptz, text) IS
    'Creates or replaces a schedule, as PUT /schedules/{name} does; next_run_at NULL is computed by a scheduler.';

-- Runs a schedule now, once, without moving next_run_at, as POST /schedules/{name}/trigger does.
-- Returns the new job's id, or NULL when there is no such schedule. The insert wakes the queue's
-- workers through the jobs table's own trigger.
CREATE FUNCTION jobqueue_schedule_run(schedule_name text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    new_id uuid;
BEGIN
    INSERT INTO jobs (queue, payload, priority, max_attempts)
    SELECT s.queue, s.payload, s.priority, s.max_attempts FROM schedules s WHERE s.name = schedule_name
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        RETURN NULL;
    END IF;
    -- clock_timestamp(): two manual runs in one transaction still get distinct keys.
    INSERT INTO schedule_runs (schedule, tick, job_id, manual) VALUES (schedule_name, clock_timestamp(), new_id, true);
    UPDATE schedules SET last_job_id = new_id WHERE name = schedule_name;
    RETURN new_id;
END
$$;

COMMENT ON FUNCTION jobqueue_schedule_run(text) IS
    'Runs a schedule now, once, without moving it, as POST /schedules/{name}/trigger does; returns the job id.';
