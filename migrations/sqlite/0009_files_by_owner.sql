-- A subject's files by expiry: the bytes of its live files are summed at
-- every upload, against FILES_QUOTA_MB.
CREATE INDEX files_by_owner ON files (owner, expires_ms);
