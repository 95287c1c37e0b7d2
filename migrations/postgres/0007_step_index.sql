-- Only pipeline steps have a parent: their index leaves the other rows out
-- (every execution's record was an insert into it, for a NULL).
DROP INDEX executions_by_parent;
CREATE INDEX executions_by_parent ON executions (parent_id) WHERE parent_id IS NOT NULL;
