-- V7: jobs that wait for other jobs.
--
-- A job created with parents ("after" in the API) starts in status 'waiting' (in jobs_active, never
-- claimed: the claim index covers pending rows only) and becomes 'pending' once every parent is done.
-- If a parent ends failed or cancelled, the waiting job ends cancelled with an error naming that
-- parent, and so do its own waiting dependants, transitively.
--
--   job_dependencies (parent, child)  one row per edge, kept until retention deletes the child;
--   jobs.waiting_on                   the number of the child's parents not yet done.
--
-- Why a counter and not "are all parents done?": under READ COMMITTED two parents finishing at the
-- same time in two transactions each miss the other's uncommitted completion, and neither would
-- promote the child. Decrementing the child's counter is an UPDATE of the child's row: the second
-- decrement waits for the first one's row lock and applies to the newest row version, so exactly one
-- of them brings the counter to zero and promotes the child.
--
-- Finishing statements call jobqueue_release_dependants(ids, statuses) once per batch, in their own
-- statement, so that promotion commits with the parent's completion. The rescuer re-checks waiting
-- jobs whose parents have all finished, as a safety net for completions written by other means (a
-- plain UPDATE from psql, for one).

ALTER TABLE jobs DROP CONSTRAINT jobs_status_valid;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_valid
    CHECK (status IN ('pending', 'processing', 'waiting', 'done', 'failed', 'cancelled'));

-- Metadata only: a constant default does not rewrite the table.
ALTER TABLE jobs ADD COLUMN waiting_on integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD CONSTRAINT jobs_waiting_on_range CHECK (waiting_on >= 0);
COMMENT ON COLUMN jobs.waiting_on IS
    'While waiting: how many of the job''s parents (job_dependencies) are not done yet; it becomes pending at 0.';

CREATE TABLE job_dependencies (
    parent uuid NOT NULL,
    child  uuid NOT NULL,
    CONSTRAINT job_dependencies_pkey PRIMARY KEY (parent, child),
    CONSTRAINT job_dependencies_not_self CHECK (parent <> child)
);
-- The primary key finds a finished parent's children; this finds a job's parents (GET, rescue).
CREATE INDEX job_dependencies_child_idx ON job_dependencies (child);
COMMENT ON TABLE job_dependencies IS
    'Edges of job workflows: child waits until parent is done. No foreign keys: jobs is partitioned by status and its ids are unique per partition only.';

-- A waiting job holds its unique key like a pending one: otherwise its promotion could collide with a
-- job inserted with the same key while it waited, and fail the parent's completion.
DROP INDEX jobs_unique_key_idx;
CREATE UNIQUE INDEX jobs_unique_key_idx ON jobs_active (queue, unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing', 'waiting');
COMMENT ON COLUMN jobs.unique_key IS
    'While a job with this key is waiting, pending or processing in the same queue, no second one can be inserted.';
COMMENT ON TABLE jobs_active IS
    'Partition of jobs: waiting, pending and processing jobs; the claim scans the pending ones.';

-- Releases the dependants of jobs that have just finished, given as parallel arrays (statuses other
-- than done, failed and cancelled are ignored, so a completion batch can pass all its rows):
--   * the waiting children of done parents get their counter decremented, and become pending (their
--     queues woken) at zero;
--   * the waiting children of failed or cancelled parents end cancelled, with an error naming the
--     parent, and so do their waiting descendants.
-- All the children are locked first, in id order, like every statement that locks many jobs.
-- Returns the number of jobs changed. Costs one index probe per id when nothing depends on them.
CREATE FUNCTION jobqueue_release_dependants(parent_ids uuid[], parent_statuses text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n_cancelled integer;
    n_promoted integer;
BEGIN
    IF parent_ids IS NULL
       OR NOT EXISTS (SELECT 1 FROM job_dependencies WHERE parent = ANY(parent_ids)) THEN
        RETURN 0;
    END IF;

    CREATE TEMP TABLE IF NOT EXISTS jobqueue_released (id uuid PRIMARY KEY, n_done integer, cause text)
        ON COMMIT DELETE ROWS;
    DELETE FROM jobqueue_released;

    -- The doomed: waiting children of failed or cancelled parents, then their waiting children.
    INSERT INTO jobqueue_released (id, n_done, cause)
    WITH RECURSIVE bad AS (
        SELECT p.id, p.status FROM unnest(parent_ids, parent_statuses) AS p(id, status)
        WHERE p.status IN ('failed', 'cancelled')
    ), doomed(id, cause) AS (
        SELECT d.child, 'parent ' || b.id || ' ended ' || b.status
        FROM bad b JOIN job_dependencies d ON d.parent = b.id
        JOIN jobs_active c ON c.id = d.child AND c.status = 'waiting'
        UNION
        SELECT d.child, 'parent ' || x.id || ' ended cancelled'
        FROM doomed x JOIN job_dependencies d ON d.parent = x.id
        JOIN jobs_active c ON c.id = d.child AND c.status = 'waiting'
    )
    SELECT DISTINCT ON (id) id, NULL::integer, cause FROM doomed ORDER BY id, cause;

    -- The decremented: waiting children of done parents that are not doomed.
    INSERT INTO jobqueue_released (id, n_done, cause)
    SELECT d.child, count(*), NULL
    FROM unnest(parent_ids, parent_statuses) AS p(id, status)
    JOIN job_dependencies d ON d.parent = p.id
    WHERE p.status = 'done'
    GROUP BY d.child
    ON CONFLICT (id) DO NOTHING;

    PERFORM 1 FROM jobs_active j JOIN jobqueue_released r ON r.id = j.id
    WHERE j.status = 'waiting' ORDER BY j.id FOR UPDATE OF j;

    UPDATE jobs j
    SET status = 'cancelled', finished_at = now(), updated_at = now(), error = r.cause,
        errors = j.errors || jsonb_build_array(jsonb_build_object('attempt', j.attempts, 'at', now(), 'error', r.cause))
    FROM jobqueue_released r
    WHERE j.id = r.id AND r.cause IS NOT NULL AND j.status = 'waiting';
    GET DIAGNOSTICS n_cancelled = ROW_COUNT;

    -- Both statuses live in jobs_active: the row stays where it is.
    WITH promoted AS (
        UPDATE jobs_active j
        SET waiting_on = greatest(j.waiting_on - r.n_done, 0),
            status = CASE WHEN j.waiting_on - r.n_done <= 0 THEN 'pending' ELSE 'waiting' END,
            run_at = CASE WHEN j.waiting_on - r.n_done <= 0 THEN greatest(j.run_at, now()) ELSE j.run_at END,
            updated_at = now()
        FROM jobqueue_released r
        WHERE j.id = r.id AND r.cause IS NULL AND j.status = 'waiting'
        RETURNING j.queue, j.status
    )
    SELECT count(*) FROM (
        SELECT DISTINCT ON (queue) queue, pg_notify('jobqueue', queue) FROM promoted WHERE status = 'pending'
    ) q INTO n_promoted;

    RETURN n_cancelled + n_promoted;
END
$$;

COMMENT ON FUNCTION jobqueue_release_dependants(uuid[], text[]) IS
    'Promotes or cancels the waiting dependants of jobs that have just finished; called by every statement that finishes jobs.';

-- Cancels one job, as V5's did, and now also a waiting job like a pending one; a job cancelled here
-- cancels its waiting dependants, transitively.
CREATE OR REPLACE FUNCTION jobqueue_cancel(job_id uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    current text;
BEGIN
    SELECT status INTO current FROM jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF current IN ('pending', 'waiting') THEN
        UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now() WHERE id = job_id;
        PERFORM jobqueue_release_dependants(ARRAY[job_id], ARRAY['cancelled']);
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
