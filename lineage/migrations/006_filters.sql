-- Filters (issue 6): what a decision was made under and by which scorer, so work selection, --rethreshold
-- and the funnel are single set-based queries.
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS settings_hash VARCHAR;        -- hash of scorer versions + thresholds
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS dropped_by VARCHAR;           -- first failing scorer, NULL when kept
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS removed_paragraphs INTEGER[]; -- 0-based paragraphs cut by clipscore
