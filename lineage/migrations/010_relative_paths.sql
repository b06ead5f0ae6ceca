-- Paths inside the workspace are stored relative to its root, so a workspace can be moved or copied whole
-- (polite/workspace.py: Workspace.stored / Workspace.locate). Earlier rows held absolute paths (or URLs); each
-- is rewritten when it follows the layout only the factory writes: content-addressed images, trained rewriter
-- folders, export folders, rewrite result files and ingest shards. Anything else (a model passed with --model)
-- stays as it was, and absolute paths keep working.
UPDATE images SET path = regexp_extract(path, '/(images/[0-9a-f]{2}/i_[0-9a-f]+\.[A-Za-z0-9]+)$', 1)
WHERE regexp_matches(path, '^(/|[a-z0-9+]+://).*/images/[0-9a-f]{2}/i_[0-9a-f]+\.[A-Za-z0-9]+$');

UPDATE models SET path = regexp_extract(path, '/(models/rewriter-[0-9a-f]+)$', 1)
WHERE created_by_run IS NOT NULL AND regexp_matches(path, '^(/|[a-z0-9+]+://).*/models/rewriter-[0-9a-f]+$');

UPDATE models SET training_set = regexp_extract(training_set, '/(models/rewriter-[0-9a-f]+/training_set\.parquet)$', 1)
WHERE created_by_run IS NOT NULL
  AND regexp_matches(training_set, '^(/|[a-z0-9+]+://).*/models/rewriter-[0-9a-f]+/training_set\.parquet$');

UPDATE exports SET path = regexp_extract(path, '/(exports/[A-Za-z0-9_]+-x_[0-9a-f]+)$', 1)
WHERE regexp_matches(path, '^(/|[a-z0-9+]+://).*/exports/[A-Za-z0-9_]+-x_[0-9a-f]+$');

-- the key column: re-inserted rather than updated in place
CREATE TEMP TABLE _moved AS
SELECT path, regexp_extract(path, '/(shards/rewrites/results/.+\.parquet)$', 1) AS stored
FROM rewrite_result_files WHERE regexp_matches(path, '^(/|[a-z0-9+]+://).*/shards/rewrites/results/.+\.parquet$');
INSERT OR IGNORE INTO rewrite_result_files
SELECT f.* REPLACE (m.stored AS path) FROM rewrite_result_files f JOIN _moved m ON m.path = f.path;
DELETE FROM rewrite_result_files WHERE path IN (SELECT path FROM _moved);
DROP TABLE _moved;

UPDATE samples SET shard = regexp_extract(shard, '/(shards/samples/.+\.parquet)$', 1)
WHERE regexp_matches(shard, '^(/|[a-z0-9+]+://).*/shards/samples/.+\.parquet$');
