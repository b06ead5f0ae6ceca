-- Repeated keys within a source (issue: an arbitrary duplicate was kept and the run counted both).
-- source_row: the row of the source dataset a sample came from, so "the first occurrence of a key wins" can be
-- decided across shards and flushes. duplicate_of: set on the record of a later row whose sample id was already
-- taken (status 'failed', with the reason); it names the sample that kept the id. Rows written before this
-- migration have both NULL.
ALTER TABLE samples ADD COLUMN IF NOT EXISTS source_row BIGINT;
ALTER TABLE samples ADD COLUMN IF NOT EXISTS duplicate_of VARCHAR;
