-- Finished asynchronous executions by when they finished: the retention
-- sweep (EXECUTION_RETENTION_HOURS) deletes the oldest first. Pending and
-- running ones have no finished_ms and stay out of it.
CREATE INDEX async_executions_finished ON async_executions (finished_ms) WHERE finished_ms IS NOT NULL;
