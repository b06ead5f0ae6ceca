-- The thresholds a decision was made under, once per settings_hash (issue 6). Every decision of one
-- --rethreshold shares them: stored per row they were ~680 bytes x 100k rows written per re-decision, a
-- fifth of its time (most of it in the commit). New decisions leave decisions.thresholds NULL; the
-- latest_decisions view reads coalesce(decisions.thresholds, decision_settings.thresholds), so rows written
-- before this migration, and their readers, are unchanged.
CREATE TABLE IF NOT EXISTS decision_settings (
    settings_hash   VARCHAR PRIMARY KEY,
    thresholds      VARCHAR NOT NULL,               -- JSON: each scorer's version and thresholds
    created_at      TIMESTAMP DEFAULT current_timestamp
);
INSERT OR IGNORE INTO decision_settings (settings_hash, thresholds)
SELECT settings_hash, any_value(thresholds) FROM decisions
WHERE settings_hash IS NOT NULL AND thresholds IS NOT NULL
GROUP BY settings_hash;
