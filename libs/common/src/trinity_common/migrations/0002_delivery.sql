-- Dead letters, cancellation and idempotent submission.

ALTER TABLE jobs ADD COLUMN dead_lettered boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN idempotency_key text;

-- Listing dead jobs, newest first, optionally by queue.
CREATE INDEX jobs_dead ON jobs (finished_at DESC, job_id DESC) WHERE dead_lettered;

CREATE TABLE idempotency_keys (
    key           text PRIMARY KEY,
    request_hash  text NOT NULL,
    job_id        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
