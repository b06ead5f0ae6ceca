-- Rewriting (issue 5): which ok rewrite a rerun replaced, and which result files the flow has ingested.
-- A rerun's new ok attempt marks the earlier ok attempt of the same (sample, model, prompt version,
-- settings) with its rewrite_id, so "accepted" = status 'ok' AND superseded_by IS NULL: one per key.
ALTER TABLE rewrites ADD COLUMN IF NOT EXISTS superseded_by VARCHAR;

-- Result shards already ingested: a flow that finds a finished but un-ingested file (its process was killed
-- between writing and ingesting) ingests it instead of redoing the work.
CREATE TABLE IF NOT EXISTS rewrite_result_files (
    path            VARCHAR PRIMARY KEY,
    model_id        VARCHAR,
    prompt_version  VARCHAR,
    settings_hash   VARCHAR,
    n_rows          INTEGER,
    run_id          VARCHAR,
    ingested_at     TIMESTAMP DEFAULT current_timestamp
);
