-- Decisions without a PRIMARY KEY index (issue 6). A --rethreshold writes one decision per rewrite (100k rows
-- per 100k rewrites) and maintaining the ART index on decision_id was a third of its time, its commit most
-- of the rest. decision_id stays unique: it is md5(rewrite_id, settings_hash), rethreshold deletes before it
-- inserts, and the writer's shard ingest (lineage/store.py, UNINDEXED_TABLES) deletes or skips existing keys.
CREATE TABLE decisions_007 (
    decision_id         VARCHAR NOT NULL,
    rewrite_id          VARCHAR NOT NULL,
    kept                BOOLEAN NOT NULL,
    reason              VARCHAR,
    final_output        VARCHAR,            -- the rewrite after CLIPScore paragraph removal; NULL: nothing cut
    thresholds          VARCHAR,
    run_id              VARCHAR,
    decided_at          TIMESTAMP DEFAULT current_timestamp,
    settings_hash       VARCHAR,
    dropped_by          VARCHAR,
    removed_paragraphs  INTEGER[]
);
INSERT INTO decisions_007
SELECT decision_id, rewrite_id, kept, reason, final_output, thresholds, run_id, decided_at, settings_hash,
       dropped_by, removed_paragraphs
FROM decisions;
DROP VIEW IF EXISTS lineage;
DROP VIEW IF EXISTS latest_decisions;
DROP TABLE decisions;
ALTER TABLE decisions_007 RENAME TO decisions;
