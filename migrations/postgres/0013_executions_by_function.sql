-- No query reads execution records by function (a session's are read by
-- request_id, a pipeline's steps by parent_id, one by id, and the retention
-- sweep deletes by id). The index cost every record a fifth more disk (on
-- SQLite 293 against 243 bytes a row) and a B-tree insert, on every
-- execution, cached hits included.
DROP INDEX executions_by_function;
