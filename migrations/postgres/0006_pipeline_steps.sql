-- A pipeline's steps are executions of their own, linked to the pipeline's
-- execution (NULL for everything that is not a step). Hyphenated uuid text.
ALTER TABLE executions ADD COLUMN parent_id TEXT;
CREATE INDEX executions_by_parent ON executions (parent_id);

-- An asynchronous pipeline's steps as its running attempt reports them
-- (status, attempts, timing, output), for GET /executions/{id} and its events.
ALTER TABLE async_executions ADD COLUMN steps JSONB;
