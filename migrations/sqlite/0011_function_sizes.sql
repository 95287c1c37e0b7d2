-- What each version takes (its code and manifest, in bytes), and the
-- functions by owner: every registration sums its owner's versions against
-- FUNCTIONS_QUOTA_MB.
ALTER TABLE function_versions ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
UPDATE function_versions SET size = length(CAST(code AS BLOB)) + length(CAST(manifest AS BLOB));
CREATE INDEX functions_by_owner ON functions (owner);
