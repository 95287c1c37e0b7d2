-- One row per answered execution: who ran what version when, and how it went.
-- Written in batches off the request path.
CREATE TABLE executions (
    id             TEXT PRIMARY KEY NOT NULL,  -- uuid
    request_id     TEXT NOT NULL,              -- the session
    subject        TEXT NOT NULL,
    language_title TEXT NOT NULL,
    version        INTEGER NOT NULL,
    started_at     TEXT NOT NULL,              -- RFC 3339 UTC
    duration_ms    INTEGER NOT NULL,
    outcome        TEXT NOT NULL,              -- success, cache_hit, invalid_params, runtime_error, timeout, error
    cached         INTEGER NOT NULL,           -- 0 or 1
    cold_start     INTEGER NOT NULL            -- 0 or 1
);
CREATE INDEX executions_by_session ON executions (request_id);
CREATE INDEX executions_by_function ON executions (language_title, started_at);
