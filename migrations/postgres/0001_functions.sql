-- Functions and their immutable versions (same shape as sqlite/0001).
CREATE TABLE functions (
    language_title  TEXT PRIMARY KEY,
    language        TEXT NOT NULL,
    title           TEXT NOT NULL,
    description     TEXT NOT NULL,
    source          TEXT NOT NULL,            -- 'bundled' or 'api'
    current_version BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE function_versions (
    language_title TEXT NOT NULL,
    version        BIGINT NOT NULL,
    manifest       JSONB NOT NULL,            -- normalised manifest
    code           TEXT NOT NULL,
    code_hash      TEXT NOT NULL,             -- sha256, part of every cache key
    created_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (language_title, version)
);
