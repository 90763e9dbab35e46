-- Applied by scripts/chaos.sh to its own scratch database after the migrations; never part of the
-- product's schema. Records every change of a job's status (and any change of holder or attempt while
-- processing) into chaos_events, in the order the row saw them: updates of one row are serialised by
-- its row lock, held until commit, and the triggers below run before their statement ends, so a later
-- change always gets a larger seq.

CREATE TABLE chaos_events (
    seq            bigserial   PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    job_id         uuid        NOT NULL,
    queue          text        NOT NULL,
    unique_key     text,
    -- insert, claim (pending -> processing), exit (processing -> anything else), takeover (still
    -- processing, but another holder or attempt: must never happen), retry (failed or cancelled ->
    -- pending), other (pending -> cancelled, ...), delete.
    kind           text        NOT NULL,
    old_status     text,
    new_status     text,
    old_attempts   integer,
    new_attempts   integer,
    max_attempts   integer,
    old_locked_by  text,
    new_locked_by  text,
    result         jsonb
);

-- The checker looks up each job's events in order.
CREATE INDEX chaos_events_job_idx ON chaos_events (job_id, seq);

-- Statement-level triggers with transition tables, not row triggers: jobs is partitioned by status,
-- and an UPDATE that changes a job's partition (a completion, a cancel, a retry of a failed job)
-- fires row-level DELETE and INSERT triggers instead of UPDATE ones. The UPDATE statement's
-- transition tables do hold moved rows, before and after. Statement triggers fire for the table a
-- statement names, so they are on both the parent and jobs_active (which the service's claims,
-- heartbeats and single inserts name); nothing writes jobs_finished directly.
CREATE FUNCTION chaos_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO chaos_events (job_id, queue, unique_key, kind, new_status, new_attempts, max_attempts)
        SELECT id, queue, unique_key, 'insert', status, attempts, max_attempts FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO chaos_events (job_id, queue, unique_key, kind, old_status)
        SELECT id, queue, unique_key, 'delete', status FROM old_rows;
    ELSE
        INSERT INTO chaos_events (job_id, queue, unique_key, kind, old_status, new_status, old_attempts,
                                  new_attempts, max_attempts, old_locked_by, new_locked_by, result)
        SELECT n.id, n.queue, n.unique_key, c.kind, o.status, n.status, o.attempts, n.attempts,
               n.max_attempts, o.locked_by, n.locked_by, n.result
        FROM old_rows o
        JOIN new_rows n ON n.id = o.id
        CROSS JOIN LATERAL (SELECT CASE
            WHEN o.status = 'processing' AND n.status = 'processing' THEN
                -- A heartbeat or a cancel request is nothing; another holder or attempt must never be.
                CASE WHEN o.attempts IS DISTINCT FROM n.attempts OR o.locked_by IS DISTINCT FROM n.locked_by
                     THEN 'takeover' END
            WHEN o.status = n.status THEN NULL
            WHEN n.status = 'processing' THEN 'claim'
            WHEN o.status = 'processing' THEN 'exit'
            WHEN n.status = 'pending' THEN 'retry'
            ELSE 'other'
        END AS kind) c
        WHERE c.kind IS NOT NULL;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER chaos_record_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chaos_record();
CREATE TRIGGER chaos_record_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chaos_record();
CREATE TRIGGER chaos_record_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION chaos_record();
CREATE TRIGGER chaos_record_insert AFTER INSERT ON jobs_active
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chaos_record();
CREATE TRIGGER chaos_record_update AFTER UPDATE ON jobs_active
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chaos_record();

-- The ids the load generator was told about (201 answers, psql RETURNING), loaded by the checker.
CREATE TABLE chaos_accepted (
    id     uuid NOT NULL,
    source text NOT NULL,
    future boolean NOT NULL
);
