-- Views are re-created on every migrate, so they can evolve without a migration.

CREATE OR REPLACE VIEW latest_rewrites AS
SELECT * EXCLUDE (rn) FROM (
    SELECT r.*, row_number() OVER (
        PARTITION BY r.sample_id
        ORDER BY (r.status = 'ok') DESC, (r.superseded_by IS NULL) DESC, r.created_at DESC, r.attempt DESC, r.rewrite_id
    ) AS rn
    FROM rewrites r
) WHERE rn = 1;

-- thresholds: stored once per settings_hash in decision_settings (migration 008), per row before that.
CREATE OR REPLACE VIEW latest_decisions AS
SELECT * EXCLUDE (rn) FROM (
    SELECT d.* REPLACE (coalesce(d.thresholds, ds.thresholds) AS thresholds),
        row_number() OVER (PARTITION BY d.rewrite_id ORDER BY d.decided_at DESC, d.decision_id) AS rn
    FROM decisions d LEFT JOIN decision_settings ds ON ds.settings_hash = d.settings_hash
) WHERE rn = 1;

-- A scorer's versions all keep their rows (scores' key has scorer_version), so a re-scored rewrite has
-- several scores per scorer: show the one its latest decision read (the version named in its thresholds;
-- thresholds that come back after a re-score read the older version again), else the one scored last.
-- max() over versions showed a stale score beside a decision made on the new one.
CREATE OR REPLACE VIEW scorer_versions AS   -- the scorer versions each set of thresholds read (a few rows)
SELECT settings_hash, scorer,
    json_extract_string(thresholds, '$.scorers."' || scorer || '".version') AS scorer_version
FROM (SELECT settings_hash, thresholds, unnest(json_keys(try_cast(thresholds AS JSON), '$.scorers')) AS scorer
      FROM decision_settings);

CREATE OR REPLACE VIEW score_columns AS
SELECT sc.rewrite_id,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'reward')     AS reward,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'reward_raw') AS raw_reward,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'semantic')   AS semantic,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'nli')        AS nli,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'clipscore')  AS clipscore,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'length')     AS length,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'unchanged')  AS unchanged,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'repetition') AS repetition,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'truncated')  AS truncated,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'answer')     AS answer,
    arg_max_null(sc.score, sc._rank) FILTER (WHERE sc.scorer = 'rouge')      AS rouge
FROM (
    -- one integer to rank by (a struct was slower): read by the latest decision first, then the newest
    SELECT s.rewrite_id, s.scorer, s.score,
        (coalesce(s.scorer_version = v.scorer_version, false)::BIGINT << 56)
            + coalesce(epoch_us(s.created_at), 0) AS _rank
    FROM scores s
    LEFT JOIN (SELECT rewrite_id, settings_hash FROM latest_decisions) d ON d.rewrite_id = s.rewrite_id
    LEFT JOIN scorer_versions v ON v.settings_hash = d.settings_hash AND v.scorer = s.scorer
) sc
GROUP BY sc.rewrite_id;

CREATE OR REPLACE VIEW latest_exports AS
SELECT * EXCLUDE (rn) FROM (
    SELECT ei.sample_id, ei.rewrite_id, e.export_id, e.format, e.path AS export_path,
        e.created_at AS exported_at,
        row_number() OVER (PARTITION BY ei.sample_id ORDER BY e.created_at DESC, e.export_id) AS rn
    FROM export_items ei JOIN exports e USING (export_id)
) WHERE rn = 1;

-- One row per sample: where it came from, its latest rewrite, scores, decision and export.
CREATE OR REPLACE VIEW lineage AS
SELECT
    s.sample_id, s.source, s.source_revision, s.split, s.task_type, s.images, s.instruction, s.raw_response,
    s.status        AS sample_status,
    s.error         AS sample_error,
    s.run_id        AS ingest_run_id,
    r.rewrite_id, r.model_id, r.prompt_version, r.settings_hash, r.attempt,
    r.status        AS rewrite_status,
    r.output        AS rewrite,
    r.error         AS rewrite_error,
    r.reason        AS rewrite_reason,
    r.run_id        AS rewrite_run_id,
    sc.reward, sc.raw_reward, sc.semantic, sc.nli, sc.clipscore,
    sc.length AS length_score, sc.unchanged AS unchanged_score, sc.repetition AS repetition_score,
    sc.truncated AS truncated_score, sc.answer AS answer_score, sc.rouge,
    d.kept,
    d.reason        AS decision_reason,
    CASE WHEN d.rewrite_id IS NOT NULL THEN coalesce(d.final_output, r.output) END AS final_output,  -- NULL stored: uncut
    d.dropped_by,
    d.removed_paragraphs,
    x.export_id, x.export_path
FROM samples s
LEFT JOIN latest_rewrites r ON r.sample_id = s.sample_id
LEFT JOIN score_columns sc ON sc.rewrite_id = r.rewrite_id
LEFT JOIN latest_decisions d ON d.rewrite_id = r.rewrite_id
-- the export only if it holds this rewrite: after a rerun, the sample's earlier export holds an older text
LEFT JOIN latest_exports x ON x.sample_id = s.sample_id AND x.rewrite_id = r.rewrite_id;

-- What changed between two published datasets: one row per sample in either. a, b: an export id, or the run id
-- of an export run (its formats hold the same items). change: added | removed | rewritten (another rewrite of the
-- sample, another text) | redone (another rewrite, the same text: a rerun that wrote it again) | recut (the same
-- rewrite, but the decision each export read kept other paragraphs: a CLIPScore threshold changed) | same.
-- final_a/final_b: the cut text each export read, NULL for the whole rewrite. The *_now columns are
-- the sample's state in the lineage now (why a removed sample is out: dropped_by_now names the scorer);
-- new_sample: ingested after a was exported.
-- polite sql "SELECT change, source, count(*) FROM export_diff('run_a', 'run_b') GROUP BY ALL"  (or: polite diff)
CREATE OR REPLACE MACRO export_diff(a, b) AS TABLE
WITH side_a AS (
    SELECT DISTINCT ei.sample_id, ei.rewrite_id FROM export_items ei JOIN exports e USING (export_id)
    WHERE e.export_id = a OR e.run_id = a
), side_b AS (
    SELECT DISTINCT ei.sample_id, ei.rewrite_id FROM export_items ei JOIN exports e USING (export_id)
    WHERE e.export_id = b OR e.run_id = b
), exported AS (
    SELECT min(created_at) FILTER (WHERE export_id = a OR run_id = a) AS at_a,
        min(created_at) FILTER (WHERE export_id = b OR run_id = b) AS at_b
    FROM exports WHERE export_id IN (a, b) OR run_id IN (a, b)
), pairs AS MATERIALIZED (
    SELECT coalesce(x.sample_id, y.sample_id) AS sample_id, x.rewrite_id AS rewrite_a, y.rewrite_id AS rewrite_b
    FROM side_a x FULL JOIN side_b y ON x.sample_id = y.sample_id
), cut AS MATERIALIZED (  -- the cut text each export read of a sample both hold: its rewrite's latest decision's then
    SELECT d.rewrite_id,
        arg_max_null(d.final_output, d.decided_at) FILTER (WHERE d.decided_at <= (SELECT at_a FROM exported)) AS final_a,
        arg_max_null(d.final_output, d.decided_at) FILTER (WHERE d.decided_at <= (SELECT at_b FROM exported)) AS final_b
    FROM decisions d
    WHERE d.rewrite_id IN (SELECT rewrite_a FROM pairs WHERE rewrite_b IS NOT NULL
                           UNION ALL SELECT rewrite_b FROM pairs WHERE rewrite_a <> rewrite_b)
    GROUP BY d.rewrite_id
), redo AS (  -- samples both hold with another rewrite: did the text change? (texts read only for these)
    SELECT p.sample_id, coalesce(ca.final_a, ra.output) IS NOT DISTINCT FROM coalesce(cb.final_b, rb.output) AS same_text
    FROM pairs p JOIN rewrites ra ON ra.rewrite_id = p.rewrite_a JOIN rewrites rb ON rb.rewrite_id = p.rewrite_b
    LEFT JOIN cut ca ON ca.rewrite_id = p.rewrite_a LEFT JOIN cut cb ON cb.rewrite_id = p.rewrite_b
    WHERE p.rewrite_a <> p.rewrite_b
)
SELECT d.sample_id, s.source, s.task_type,
    CASE WHEN d.rewrite_a IS NULL THEN 'added' WHEN d.rewrite_b IS NULL THEN 'removed'
         WHEN d.rewrite_a <> d.rewrite_b THEN CASE WHEN x.same_text THEN 'redone' ELSE 'rewritten' END
         WHEN ca.final_a IS DISTINCT FROM cb.final_b THEN 'recut' ELSE 'same' END AS change,
    d.rewrite_a, d.rewrite_b, ca.final_a, cb.final_b,
    -- as the lineage view has them, without its scores (a diff of 1M items: 2.2 -> 0.9 s)
    r.rewrite_id AS rewrite_now, ld.kept AS kept_now, ld.dropped_by AS dropped_by_now, ld.reason AS reason_now,
    s.ingested_at > (SELECT at_a FROM exported) AS new_sample
FROM pairs d
LEFT JOIN cut ca ON ca.rewrite_id = d.rewrite_a AND d.rewrite_b IS NOT NULL
LEFT JOIN cut cb ON cb.rewrite_id = d.rewrite_b AND d.rewrite_a IS NOT NULL
LEFT JOIN redo x ON x.sample_id = d.sample_id
LEFT JOIN samples s ON s.sample_id = d.sample_id
LEFT JOIN latest_rewrites r ON r.sample_id = d.sample_id
LEFT JOIN latest_decisions ld ON ld.rewrite_id = r.rewrite_id;
