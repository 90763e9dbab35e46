-- V5: the job and queue transitions as SQL functions, so that psql users have the API's powers in one
-- call, notifications included, and the API runs the very same definitions:
--
--     SELECT jobqueue_cancel('8d0c5e2a-4f3b-4c1e-9a57-2b1f6f0e9c41');
--     SELECT id, jobqueue_retry(id) FROM jobs WHERE status = 'failed' AND queue = 'email';
--     SELECT jobqueue_pause('email');   SELECT jobqueue_resume('email');
--
-- Each function does what its endpoint does, in the caller's transaction: the wake-up sent by a
-- retry or a resume, and the cancel request sent to the instance running a job, are delivered when
-- that transaction commits (and never if it rolls back). Each returns what happened, as a word the
-- API maps to its status codes. They touch `jobs` only through INSERT, SELECT ... WHERE id and
-- UPDATE, so they do not depend on how the table is stored.
--
-- Forward-only, like every migration: earlier files are never edited.

-- Cancels one job. Returns:
--   'cancelled'  it was pending: it is now cancelled (finished_at set);
--   'requested'  it was processing: cancel_requested_at is set (the first request's time is kept)
--                and NOTIFY jobqueue_cancel, '<id>' tells its holder to stop the handler, which ends
--                the job cancelled;
--   'finished'   it was already done, failed or cancelled: nothing changed;
--   'not_found'  no job has this id.
-- The row is locked before the status is read, so a concurrent claim or completion either happened
-- before (and is seen) or waits for this transaction.
CREATE FUNCTION jobqueue_cancel(job_id uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    current text;
BEGIN
    SELECT status INTO current FROM jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF current = 'pending' THEN
        UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now() WHERE id = job_id;
        RETURN 'cancelled';
    ELSIF current = 'processing' THEN
        UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
        WHERE id = job_id;
        -- Delivered at commit to every instance's listener; the holder cancels the handler. A remote
        -- worker learns of it from its next heartbeat's answer.
        PERFORM pg_notify('jobqueue_cancel', job_id::text);
        RETURN 'requested';
    END IF;
    RETURN 'finished';
END
$$;

COMMENT ON FUNCTION jobqueue_cancel(uuid) IS
    'Cancels a job as POST /jobs/{id}/cancel does; returns cancelled, requested, finished or not_found.';

-- Runs a failed or cancelled job again: back to pending, runnable now, attempts reset to 0, result,
-- finished_at and cancel_requested_at cleared, the error and its history kept, and the queue's
-- workers woken. Returns 'retried', 'refused' (the job is pending, processing or done: nothing
-- changed; a done job never runs again) or 'not_found'. One conditional UPDATE, so calling it over a
-- set of rows is safe against concurrent changes:
--     SELECT jobqueue_retry(id) FROM jobs WHERE status = 'failed' AND queue = 'email';
-- One notification per queue and transaction however many rows: PostgreSQL folds identical ones.
CREATE FUNCTION jobqueue_retry(job_id uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    q text;
BEGIN
    UPDATE jobs
    SET status = 'pending', attempts = 0, run_at = now(), result = NULL, updated_at = now(),
        finished_at = NULL, cancel_requested_at = NULL
    WHERE id = job_id AND status IN ('failed', 'cancelled')
    RETURNING queue INTO q;
    IF FOUND THEN
        PERFORM pg_notify('jobqueue', q);
        RETURN 'retried';
    END IF;
    PERFORM 1 FROM jobs WHERE id = job_id;
    RETURN CASE WHEN FOUND THEN 'refused' ELSE 'not_found' END;
END
$$;

COMMENT ON FUNCTION jobqueue_retry(uuid) IS
    'Runs a failed or cancelled job again, as POST /jobs/{id}/retry does; returns retried, refused or not_found.';

-- Pauses a queue: no claim, in-process or remote, takes its jobs from the next claim on. Jobs keep
-- being accepted, and running ones finish. Returns true (the queue is paused).
CREATE FUNCTION jobqueue_pause(queue_name text) RETURNS boolean
LANGUAGE sql AS $$
    INSERT INTO queues (name, paused) VALUES (queue_name, true)
    ON CONFLICT (name) DO UPDATE SET paused = true, updated_at = now()
    RETURNING paused;
$$;

-- Resumes a queue and wakes its workers everywhere (producers and remote long-polls), so its backlog
-- is claimed at once rather than at the next poll. Returns false (the queue is not paused).
CREATE FUNCTION jobqueue_resume(queue_name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO queues (name, paused) VALUES (queue_name, false)
    ON CONFLICT (name) DO UPDATE SET paused = false, updated_at = now();
    PERFORM pg_notify('jobqueue', queue_name);
    RETURN false;
END
$$;

COMMENT ON FUNCTION jobqueue_pause(text) IS 'Pauses a queue everywhere, as POST /queues/{queue}/pause does.';
COMMENT ON FUNCTION jobqueue_resume(text) IS
    'Resumes a queue and wakes its workers, as POST /queues/{queue}/resume does.';
