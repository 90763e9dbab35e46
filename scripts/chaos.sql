-- Applied by scripts/chaos.sh to its own scratch database after the migrations; never part of the
-- product's schema. Records every change of a job's status (and any change of holder or attempt while
-- processing) into chaos_events, in the order the row saw them: updates of one row are serialised by
-- its row lock, so a later change always gets a larger seq.

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

CREATE FUNCTION chaos_record() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    k text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO chaos_events (job_id, queue, unique_key, kind, new_status, new_attempts, max_attempts)
        VALUES (NEW.id, NEW.queue, NEW.unique_key, 'insert', NEW.status, NEW.attempts, NEW.max_attempts);
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO chaos_events (job_id, queue, unique_key, kind, old_status)
        VALUES (OLD.id, OLD.queue, OLD.unique_key, 'delete', OLD.status);
        RETURN NULL;
    END IF;
    IF OLD.status = 'processing' AND NEW.status = 'processing' THEN
        IF OLD.attempts IS DISTINCT FROM NEW.attempts OR OLD.locked_by IS DISTINCT FROM NEW.locked_by THEN
            k := 'takeover';
        ELSE
            RETURN NULL;          -- a heartbeat or a cancel request
        END IF;
    ELSIF OLD.status = NEW.status THEN
        RETURN NULL;
    ELSIF NEW.status = 'processing' THEN
        k := 'claim';
    ELSIF OLD.status = 'processing' THEN
        k := 'exit';
    ELSIF NEW.status = 'pending' THEN
        k := 'retry';
    ELSE
        k := 'other';
    END IF;
    INSERT INTO chaos_events (job_id, queue, unique_key, kind, old_status, new_status, old_attempts,
                              new_attempts, max_attempts, old_locked_by, new_locked_by, result)
    VALUES (NEW.id, NEW.queue, NEW.unique_key, k, OLD.status, NEW.status, OLD.attempts, NEW.attempts,
            NEW.max_attempts, OLD.locked_by, NEW.locked_by, NEW.result);
    RETURN NULL;
END
$$;

CREATE TRIGGER chaos_record AFTER INSERT OR UPDATE OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION chaos_record();

-- The ids the load generator was told about (201 answers, psql RETURNING), loaded by the checker.
CREATE TABLE chaos_accepted (
    id     uuid NOT NULL,
    source text NOT NULL,
    future boolean NOT NULL
);
