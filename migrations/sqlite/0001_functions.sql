-- Functions and their immutable versions. A version row is never changed:
-- sessions started on version N keep running version N.
CREATE TABLE functions (
    language_title  TEXT PRIMARY KEY NOT NULL,
    language        TEXT NOT NULL,
    title           TEXT NOT NULL,
    description     TEXT NOT NULL,
    source          TEXT NOT NULL,            -- 'bundled' or 'api'
    current_version INTEGER NOT NULL,
    created_at      TEXT NOT NULL,            -- RFC 3339 UTC
    updated_at      TEXT NOT NULL
);

CREATE TABLE function_versions (
    language_title TEXT NOT NULL,
    version        INTEGER NOT NULL,
    manifest       TEXT NOT NULL,             -- normalised manifest, JSON
    code           TEXT NOT NULL,
    code_hash      TEXT NOT NULL,             -- sha256, part of every cache key
    created_at     TEXT NOT NULL,
    PRIMARY KEY (language_title, version)
);
