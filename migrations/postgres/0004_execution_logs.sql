-- What each execution's function wrote to stdout and stderr (only
-- executions that wrote something have a row), kept for LOG_RETENTION_HOURS.
-- The same table as migrations/sqlite/0004.
CREATE TABLE execution_logs (
    execution_id   TEXT PRIMARY KEY NOT NULL,  -- the execution record's id
    request_id     TEXT NOT NULL,              -- its session or asynchronous execution
    subject        TEXT NOT NULL,
    language_title TEXT NOT NULL,
    created_ms     BIGINT NOT NULL,            -- Unix milliseconds
    lines          TEXT NOT NULL,              -- JSON: [[ts_ms, "stdout" | "stderr", text], ...]
    bytes          BIGINT  NOT NULL,           -- kept, each line with its newline
    dropped_bytes  BIGINT  NOT NULL            -- written past the cap, not kept
);
CREATE INDEX execution_logs_by_request ON execution_logs (request_id);
CREATE INDEX execution_logs_by_function ON execution_logs (language_title, created_ms);
CREATE INDEX execution_logs_by_age ON execution_logs (created_ms);

-- Who registered a function (NULL: bundled with the controller): its owner
-- reads every execution's logs.
ALTER TABLE functions ADD COLUMN owner TEXT;
