-- V12: whether any job has dependants, asked before a finishing statement releases them.
--
-- Every statement that ends jobs releases their waiting dependants in the same statement (V7). It
-- used to aggregate the ids and statuses of its whole batch and call jobqueue_release_dependants(),
-- whose first step probes job_dependencies' key once per id, even in a database that has never held a
-- workflow. The statements now ask this first, once per statement, and aggregate and call only when
-- the answer is yes: SQL alone, 300-job finishes, 0.3-0.5 µs a job less (docs/performance.md).
--
-- PL/pgSQL and VOLATILE on purpose: its query takes a fresh snapshot, as the release's own queries
-- do. A job inserted with `after` locks its parents FOR SHARE; a completion that waited for that
-- lock must see the new edges, which the finishing statement's own snapshot, taken before the wait,
-- does not. The statements ask it only after every row of their batch is written, for the same reason.
CREATE FUNCTION jobqueue_has_dependants() RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM job_dependencies);
END
$$;

COMMENT ON FUNCTION jobqueue_has_dependants() IS
    'Whether any job waits on another (job_dependencies holds an edge); read with a fresh snapshot.';
