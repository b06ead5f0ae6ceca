-- Which export folders each export run published. An export folder (`exports`, one row per export id) is
-- written once; a later run that selects the same content finds it done and reuses it, and records only here.
-- So `polite diff` (the two latest export runs) and the question "what did run X publish" read this table,
-- not exports.run_id (the run that wrote the folder first). Filled by the export flow once every format of a
-- run is written, for new and reused folders alike; rows of exports made before this migration are backfilled
-- under the run that wrote them (the export id where no run was recorded).
CREATE TABLE IF NOT EXISTS export_runs (
    run_id          VARCHAR NOT NULL,
    export_id       VARCHAR NOT NULL,
    published_at    TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (run_id, export_id)
);

INSERT OR IGNORE INTO export_runs (run_id, export_id, published_at)
SELECT coalesce(run_id, export_id), export_id, created_at FROM exports;
