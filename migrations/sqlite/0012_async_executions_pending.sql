-- Each subject's pending asynchronous executions: a submit counts them
-- against EXECUTION_MAX_PENDING_PER_SUBJECT. Without it the count walked
-- every pending run of every subject (the queue's index), so one
-- subject's long queue slowed everyone's submits.
CREATE INDEX async_executions_pending ON async_executions (subject) WHERE status = 'pending';
