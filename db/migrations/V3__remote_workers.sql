-- V3: remote workers (a lease token per attempt), queues as objects (pause), and the instances that
-- serve them.
--
-- Forward-only, like every migration: V1 and V2 are never edited.

-- The credential of one attempt. Every claim over HTTP writes a fresh value: two gen_random_uuid()
-- values, which come from PostgreSQL's strong random source, give 244 random bits as 64 hex digits;
-- an in-process claim writes NULL, which matches no token. Remote workers present it on heartbeat,
-- complete, fail, snooze and release; those statements match it together with status =
-- 'processing', so a token only means something while its attempt runs, and the next claim replaces
-- it. Deliberately in no index: heartbeats rewrite locked_until on the same row, and they stay HOT.
ALTER TABLE jobs ADD COLUMN lease_token text;

COMMENT ON COLUMN jobs.lease_token IS
    'Secret bound to the current remote attempt, set by every remote claim (NULL for in-process claims); remote lease calls are fenced on it. Shown only in the claim answer.';

-- A queue exists as soon as a job names it; a row here holds its settings. Today that is only
-- whether it is paused: every claim, on every instance and over HTTP, skips a paused queue. Inserts
-- are still accepted. A psql user may pause a queue with
--     INSERT INTO queues (name, paused) VALUES ('email', true)
--     ON CONFLICT (name) DO UPDATE SET paused = true;
CREATE TABLE queues (
    name       text        NOT NULL,
    paused     boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT queues_pkey PRIMARY KEY (name),
    CONSTRAINT queues_name_valid CHECK (length(name) BETWEEN 1 AND 128)
);

COMMENT ON TABLE queues IS
    'Per-queue settings that every instance honours. A queue without a row is an unpaused queue.';

-- Each running instance registers here at start-up and refreshes heartbeat_at periodically, so that
-- GET /queues can say who serves a queue in-process. An instance that died stops refreshing; readers
-- ignore rows whose heartbeat is old, and the instances themselves delete rows far older than that.
CREATE TABLE instances (
    id           text        NOT NULL,
    queues       text[]      NOT NULL DEFAULT '{}',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT instances_pkey PRIMARY KEY (id)
);

COMMENT ON TABLE instances IS
    'Running service instances and the queues each serves in-process; rows with an old heartbeat_at are dead instances.';
COMMENT ON COLUMN instances.queues IS
    'Queues this instance runs handlers for. Remote workers are not instances and are not listed here.';
