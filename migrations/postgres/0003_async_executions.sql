-- Asynchronous executions (POST /api/v1/executions): the durable queue and
-- each execution's state. Times are Unix milliseconds (BIGINT), so backoff
-- and leases keep their precision in both databases.
CREATE TABLE async_executions (
    id               TEXT PRIMARY KEY,
    subject          TEXT NOT NULL,
    language_title   TEXT NOT NULL,
    version          BIGINT NOT NULL,            -- pinned at submission
    params           JSONB NOT NULL,
    context          JSONB NOT NULL,
    timeout_ms       BIGINT NOT NULL,
    priority         INTEGER NOT NULL,           -- 0 low, 1 normal, 2 high
    status           TEXT NOT NULL,              -- pending, running, completed, failed, cancelled
    idempotency_key  TEXT,
    cache            TEXT,                       -- X-Cache-Control of the submission (NULL: the default)
    max_attempts     INTEGER NOT NULL,
    backoff_ms       BIGINT NOT NULL,
    retry_runtime_errors BOOLEAN NOT NULL,
    attempt          INTEGER NOT NULL,           -- attempts claimed so far
    attempts         JSONB NOT NULL,             -- each finished attempt: number, times, outcome, error
    result           JSONB,
    error            JSONB,
    cold_start       BOOLEAN NOT NULL,
    cancel_requested BOOLEAN NOT NULL,
    created_ms       BIGINT NOT NULL,
    started_ms       BIGINT,
    finished_ms      BIGINT,
    run_after_ms     BIGINT NOT NULL,            -- not claimed before (backoff)
    lease_owner      TEXT,                       -- the replica running it
    lease_until_ms   BIGINT,                     -- another replica takes it over after this
    callback_url     TEXT,                       -- POSTed the final state, signed
    callback_status  TEXT,                       -- pending, delivered, failed (NULL: none yet)
    callback_attempts INTEGER NOT NULL,
    callback_next_ms BIGINT,                      -- the next delivery attempt (also a claim's hold)
    delivery_id      TEXT,                       -- one per final state: receivers drop duplicates by it
    callback_error   TEXT                        -- why the last delivery attempt failed
);
CREATE UNIQUE INDEX async_executions_idempotency ON async_executions (subject, idempotency_key);
CREATE INDEX async_executions_queue ON async_executions (status, priority DESC, run_after_ms, created_ms);
CREATE INDEX async_executions_callbacks ON async_executions (callback_status, callback_next_ms);
CREATE INDEX async_executions_by_subject ON async_executions (subject, created_ms DESC);

-- Per subject: the key that signs its callbacks (HMAC-SHA256); its owner
-- reads and rotates it.
CREATE TABLE signing_secrets (
    subject    TEXT PRIMARY KEY,
    secret     TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
