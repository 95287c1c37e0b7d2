-- Uploaded files (POST /api/v1/files): one row per upload, its bytes a blob
-- kept once per sha256 in the file store (DATA_DIR/files/), removed with the
-- last row that refers to it. Times are Unix milliseconds; a file is gone
-- after expires_ms (FILE_RETENTION_HOURS). The same table as
-- migrations/postgres/0005.
CREATE TABLE files (
    id           TEXT PRIMARY KEY NOT NULL,  -- the file_id, a UUID
    owner        TEXT NOT NULL,              -- the uploading token's sub: the only reader
    name         TEXT NOT NULL,              -- for Content-Disposition
    size         INTEGER NOT NULL,           -- bytes
    content_type TEXT NOT NULL,              -- sniffed from the first bytes
    sha256       TEXT NOT NULL,              -- hex: names the blob
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL
);
CREATE INDEX files_by_sha256 ON files (sha256);
CREATE INDEX files_by_expiry ON files (expires_ms);
