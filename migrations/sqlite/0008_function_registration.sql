-- Which registration of a name a function is: a function deleted and
-- registered again under the same name starts at version 1 again, so
-- (language_title, version) alone would let an instance, a cached version
-- or another replica take the deleted code for the new one. Set when the
-- function is created (a UUID), kept by its updates.
ALTER TABLE functions ADD COLUMN registration TEXT NOT NULL DEFAULT '';
-- One row per name exists: the name tells the rows written before apart.
UPDATE functions SET registration = 'before-0008:' || language_title;
