-- Datasets, jobs, their attempts and results.

CREATE TABLE datasets (
    dataset_id    text PRIMARY KEY,
    name          text NOT NULL,
    size_bytes    bigint NOT NULL CHECK (size_bytes >= 0),
    sha256        text NOT NULL,
    content_type  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    job_id            text PRIMARY KEY,
    queue             text NOT NULL,
    state             text NOT NULL CHECK (
        state IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled')),
    submission        integer NOT NULL DEFAULT 1,
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    command           jsonb NOT NULL DEFAULT '{}',
    progress_percent  real NOT NULL DEFAULT 0,
    progress_message  text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL,
    started_at        timestamptz,
    finished_at       timestamptz,
    heartbeat_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    summary           jsonb,
    error_type        text,
    error_message     text,
    -- Status stream sequence of the last event folded in; older events are stale.
    last_event_seq    bigint NOT NULL DEFAULT 0
);

-- Listing a queue's jobs newest first, optionally by state.
CREATE INDEX jobs_queue_created ON jobs (queue, created_at DESC, job_id DESC);
CREATE INDEX jobs_created ON jobs (created_at DESC, job_id DESC);

CREATE TABLE job_attempts (
    job_id         text NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    submission     integer NOT NULL,
    attempt        integer NOT NULL,
    worker         text NOT NULL DEFAULT '',
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz,
    outcome        text,
    error_type     text,
    error_message  text,
    PRIMARY KEY (job_id, submission, attempt)
);

-- Written once per job, whatever the number of deliveries: the worker inserts
-- with ON CONFLICT DO NOTHING before it acknowledges the message.
CREATE TABLE job_results (
    job_id      text PRIMARY KEY,
    queue       text NOT NULL,
    result      jsonb,
    object_name text,
    summary     jsonb NOT NULL DEFAULT '{}',
    size_bytes  bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((result IS NULL) <> (object_name IS NULL))
);
