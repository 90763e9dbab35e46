-- V13: the insert's NOTIFY without copying the inserted rows.
--
-- The wake-up on insert was a statement-level trigger with a transition table (V1, V4): Postgres
-- copied every inserted row, payload included, into a tuplestore (spilling to a temporary file past
-- work_mem) so that the trigger could read back its distinct queues. That copy was about a tenth of
-- a bulk insert (`INSERT ... SELECT` of 100,000 jobs: 728-761 ms, 648-699 ms without it; profile in
-- docs/performance.md).
--
-- Now a row trigger on jobs_active sends the notification from its WHEN clause, which Postgres
-- evaluates as each row is inserted. The clause is always false, so no trigger event is queued and
-- the function is never called; pg_notify() folds identical notifications within a transaction, so
-- the contract is unchanged: one `NOTIFY jobqueue, '<queue>'` per queue that received pending jobs,
-- delivered at commit, none for a rollback, none for rows inserted already finished or waiting.
-- On jobs_active only: every pending row lands there, whichever relation the statement names (jobs,
-- jobs_active, COPY), and the finish's move of rows into jobs_finished evaluates nothing. A row moved
-- back into jobs_active as pending (a retry of a finished job) notifies too, as it should.
--
-- The function is written as the row trigger it would be if it were called, so that the wake-up
-- stays right even if a future Postgres queued the event: a second identical pg_notify() is folded.
DROP TRIGGER jobs_notify_inserted ON jobs;
DROP TRIGGER jobs_active_notify_inserted ON jobs_active;

CREATE OR REPLACE FUNCTION jobs_notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'pending' THEN
        PERFORM pg_notify('jobqueue', NEW.queue);
    END IF;
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION jobs_notify_inserted() IS
    'Not called in practice: the WHEN clause of trigger jobs_active_notify_inserted sends the notification and is always false.';

CREATE TRIGGER jobs_active_notify_inserted
    AFTER INSERT ON jobs_active
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND pg_notify('jobqueue', NEW.queue)::text IS NULL)
    EXECUTE FUNCTION jobs_notify_inserted();
