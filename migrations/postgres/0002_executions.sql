-- One row per answered execution: who ran what version when, and how it went.
-- Written in batches off the request path.
CREATE TABLE executions (
    id             UUID PRIMARY KEY,
    request_id     TEXT NOT NULL,              -- the session
    subject        TEXT NOT NULL,
    language_title TEXT NOT NULL,
    version        BIGINT NOT NULL,
    started_at     TIMESTAMPTZ NOT NULL,
    duration_ms    BIGINT NOT NULL,
    outcome        TEXT NOT NULL,              -- success, cache_hit, invalid_params, runtime_error, timeout, error
    cached         BOOLEAN NOT NULL,
    cold_start     BOOLEAN NOT NULL
);
CREATE INDEX executions_by_session ON executions (request_id);
CREATE INDEX executions_by_function ON executions (language_title, started_at);
