"""The chain as set-based SQL: pick the work, and re-decide from stored scores (``--rethreshold``).

Decisions from SQL and from the Python chain must agree row for row (tests hold them equal): same order,
same rules (each scorer's ``passes_sql``/``reason_sql``), same ids (md5 of rewrite id and settings hash),
same paragraph cuts.
"""

from __future__ import annotations

from typing import Any

from filters.base import sql_str
from filters.chain import Chain

DECISION_COLUMNS = (
    "decision_id",
    "rewrite_id",
    "kept",
    "reason",
    "final_output",
    "run_id",
    "settings_hash",
    "dropped_by",
    "removed_paragraphs",
)


# what --rethreshold re-decides by default: every rewrite filtered before
DECIDED = "r.rewrite_id IN (SELECT rewrite_id FROM decisions)"
NOW_UTC = "CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)"


def _version_filter(chain: Chain, alias: str = "") -> str:
    p = f"{alias}." if alias else ""
    pairs = " OR ".join(
        f"({p}scorer = {sql_str(s.name)} AND {p}scorer_version = {sql_str(s.version)})" for s in chain.scorers
    )
    return f"({pairs})" if pairs else "FALSE"


def target_sql(scope: str = "TRUE") -> str:
    """Latest ok rewrite per sample, with what the rules need from its sample; ``scope`` narrows it."""
    return (
        "SELECT r.rewrite_id, r.output, s.task_type, s.source, len(coalesce(s.images, [])) AS n_images "
        "FROM latest_rewrites r JOIN samples s ON s.sample_id = r.sample_id "
        f"WHERE r.status = 'ok' AND ({scope})"
    )


def decide_sql(
    chain: Chain, scope: str = "TRUE", run_id: str | None = None, target_table: str | None = None
) -> str:
    """A SELECT producing one ``decisions`` row per rewrite in scope, from stored scores only.

    ``target_table``: a table already holding ``target_sql(scope)``'s rows (the CTE is read twice, and
    recomputing ``latest_rewrites`` each time costs more than materialising it once)."""
    if not chain.scorers:
        raise ValueError("no scorer is enabled: nothing to decide on")
    # Each (scorer, version) gets a small integer once, by a join, so the per-scorer aggregates filter on an
    # integer instead of comparing two strings per score row (1M rows at 100k rewrites x 10 scorers), and
    # one bit mask says which scorers have a row.
    keys = ", ".join(f"({k}, {sql_str(s.name)}, {sql_str(s.version)})" for k, s in enumerate(chain.scorers))
    pivot = ["bit_or(1::UBIGINT << k) AS _has"]
    for k, s in enumerate(chain.scorers):
        # Carrying every details string through the group-by is its main cost: only where the rule reads it.
        need = f"k = {k}" if s.rule_reads_details else f"k = {k} AND score IS NULL"
        pivot += [
            f'max(score) FILTER (WHERE k = {k}) AS "{s.name}__score"',
            f'any_value(details) FILTER (WHERE {need}) AS "{s.name}__details"',
        ]
    has = {s.name: f"(p._has >> {k}) & 1 = 1" for k, s in enumerate(chain.scorers)}
    ok = []
    for s in chain.scorers:
        sc, de = f'p."{s.name}__score"', f'p."{s.name}__details"'
        ok.append(
            f"CASE WHEN NOT ({s.applies_sql('t.task_type', 't.n_images')}) THEN TRUE "
            f"WHEN NOT coalesce({has[s.name]}, FALSE) THEN NULL "
            f'ELSE {s.passes_sql(sc, de)} END AS "{s.name}__ok"'
        )
    reason, dropped = [], []
    for s in chain.scorers:
        sc, de = f'"{s.name}__score"', f'"{s.name}__details"'
        col = f'"{s.name}__ok"'
        unscored = sql_str(f"unscored: {s.name} (run `polite filter` to score)")
        reason.append(
            f"WHEN {col} IS NULL THEN {unscored} WHEN NOT {col} THEN 'dropped: ' || ({s.reason_sql(sc, de)})"
        )
        dropped.append(f"WHEN {col} IS NULL OR NOT {col} THEN {sql_str(s.name)}")
    clip = chain.scorer("clipscore")
    if clip is not None:
        # NULL final_output means "the rewrite as it is": most rewrites lose no paragraph, and copying
        # every rewrite's text into each decision was a third of the decide query's time.
        final, removed = clip.final_output_sql("output", "_clip_scores")
        has_clip = '"clipscore__has" AND "clipscore__score" IS NOT NULL'
        final = f"CASE WHEN {has_clip} THEN {final} END"
        removed_sql = f"CASE WHEN {has_clip} THEN {removed} END"
        clip_scores = ", " + clip.paragraph_scores_sql('p."clipscore__details"') + " AS _clip_scores"
    else:
        final, removed_sql, clip_scores = "CAST(NULL AS VARCHAR)", "CAST(NULL AS INTEGER[])", ""
    h = chain.settings_hash
    return f"""
WITH target AS ({f"SELECT * FROM {target_table}" if target_table else target_sql(scope)}),
keys(k, scorer, scorer_version) AS (VALUES {keys}),
piv AS (
    SELECT rewrite_id, {", ".join(pivot)}
    FROM scores JOIN keys USING (scorer, scorer_version)
    WHERE rewrite_id IN (SELECT rewrite_id FROM target)
    GROUP BY rewrite_id
),
ev AS (
    SELECT t.rewrite_id, t.output, p.* EXCLUDE (rewrite_id, _has),
        {", ".join(f'{has[s.name]} AS "{s.name}__has"' for s in chain.scorers)}, {", ".join(ok)}{clip_scores}
    FROM target t LEFT JOIN piv p ON p.rewrite_id = t.rewrite_id
),
decided AS (
    SELECT *, CASE {" ".join(reason)} ELSE 'kept' END AS reason,
        CASE {" ".join(dropped)} ELSE NULL END AS dropped_by
    FROM ev
)
SELECT
    'd_' || substr(md5(rewrite_id || ':' || {sql_str(h)}), 1, 20) AS decision_id,
    rewrite_id,
    dropped_by IS NULL AS kept,
    reason,
    {final} AS final_output,
    {sql_str(run_id) if run_id else "CAST(NULL AS VARCHAR)"} AS run_id,
    {sql_str(h)} AS settings_hash,
    dropped_by,
    CAST({removed_sql} AS INTEGER[]) AS removed_paragraphs
FROM decided
"""


def record_settings(con, chain: Chain) -> None:
    """The chain's thresholds, once per settings hash; decisions refer to them by ``settings_hash``."""
    con.execute(
        "INSERT OR IGNORE INTO decision_settings (settings_hash, thresholds) VALUES (?, ?)",
        [chain.settings_hash, chain.thresholds_json()],
    )


def rethreshold(con, chain: Chain, run_id: str | None = None, scope: str | None = None) -> dict[str, int]:
    """Re-decide every already-filtered rewrite (or ``scope``) from stored scores, set-based, no model.

    Runs inside the caller's writer connection, in one transaction. Decisions already made under these
    settings are replaced (delete + insert: an upsert of 100k rows is ten times slower in DuckDB) with a
    fresh ``decided_at``, so thresholds that come back (A -> B -> A) become the latest decisions again.
    """
    scope = scope or DECIDED
    h = sql_str(chain.settings_hash)
    cols = ", ".join(DECISION_COLUMNS)
    con.execute("BEGIN TRANSACTION")
    try:
        record_settings(con, chain)
        con.execute(f"CREATE OR REPLACE TEMP TABLE _rethreshold_scope AS {target_sql(scope)}")
        con.execute(
            f"DELETE FROM decisions WHERE settings_hash = {h} "
            "AND rewrite_id IN (SELECT rewrite_id FROM _rethreshold_scope)"
        )
        decided = decide_sql(chain, run_id=run_id, target_table="_rethreshold_scope")
        con.execute(f"INSERT INTO decisions ({cols}, decided_at) SELECT {cols}, {NOW_UTC} FROM ({decided})")
        n, kept = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE kept) FROM decisions "
            f"WHERE settings_hash = {h} AND rewrite_id IN (SELECT rewrite_id FROM _rethreshold_scope)"
        ).fetchall()[0]
        con.execute("DROP TABLE _rethreshold_scope")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return {"decided": int(n), "kept": int(kept)}


def returning_sql(chain: Chain) -> str:
    """Rewrites decided under ``chain``'s settings before whose latest decision used other settings (a
    ``--rethreshold --set`` since): a plain filter run makes its settings their latest decision again."""
    h = sql_str(chain.settings_hash)
    return (
        f"r.rewrite_id IN (SELECT rewrite_id FROM latest_decisions WHERE settings_hash IS DISTINCT FROM {h}) "
        f"AND r.rewrite_id IN (SELECT rewrite_id FROM decisions WHERE settings_hash = {h})"
    )


def work_sql(chain: Chain, full_scoring: bool = False, pending_only: bool = True) -> str:
    """Latest ok rewrites that have no decision under the current settings (or, with ``full_scoring``, miss
    an applicable score), joined with their sample, image paths and the scores already stored.
    ``pending_only=False`` selects every latest ok rewrite (to compare against the SQL decisions)."""
    applicable = (
        " + ".join(
            f"CASE WHEN {s.applies_sql('w.task_type', 'w.n_images')} THEN 1 ELSE 0 END" for s in chain.scorers
        )
        or "0"
    )
    undecided = (
        "NOT EXISTS (SELECT 1 FROM decisions d WHERE d.rewrite_id = w.rewrite_id "
        f"AND d.settings_hash = {sql_str(chain.settings_hash)})"
    )
    errored, err_cte = _retryable_errors(chain, full_scoring)
    need = f"({undecided} OR {errored})"
    if full_scoring:
        need = f"({need} OR ({applicable}) > len(coalesce(pr.prior, [])))"
    if not pending_only:
        need = "TRUE"
    return f"""
WITH w AS (
    SELECT r.rewrite_id, r.sample_id, s.source, s.task_type, s.instruction, s.raw_response,
        r.output AS rewrite, coalesce(s.images, []) AS images, len(coalesce(s.images, [])) AS n_images
    FROM latest_rewrites r JOIN samples s ON s.sample_id = r.sample_id
    WHERE r.status = 'ok'
),
img AS (
    SELECT u.rewrite_id, list(im.path ORDER BY u.pos) AS image_paths
    FROM (SELECT rewrite_id, unnest(images) AS image_id, unnest(range(len(images))) AS pos FROM w) u
    LEFT JOIN images im ON im.image_id = u.image_id
    GROUP BY u.rewrite_id
),
pr AS (
    SELECT sc.rewrite_id, list({{'scorer': sc.scorer, 'score': sc.score, 'details': sc.details}}) AS prior
    FROM scores sc WHERE sc.rewrite_id IN (SELECT rewrite_id FROM w) AND sc.score IS NOT NULL
        AND {_version_filter(chain, "sc")}
    GROUP BY sc.rewrite_id
){err_cte}
SELECT w.rewrite_id, w.sample_id, w.source, w.task_type, w.instruction, w.raw_response, w.rewrite,
    coalesce(img.image_paths, CAST([] AS VARCHAR[])) AS image_paths, pr.prior
FROM w LEFT JOIN img ON img.rewrite_id = w.rewrite_id LEFT JOIN pr ON pr.rewrite_id = w.rewrite_id
{"LEFT JOIN err ON err.rewrite_id = w.rewrite_id" if err_cte else ""}
WHERE {need}
ORDER BY w.rewrite_id
"""


def _retryable_errors(chain: Chain, full_scoring: bool) -> tuple[str, str]:
    """(predicate, CTE) selecting rewrites with an errored score (score NULL) that the chain will retry.

    A score that errored (unreadable image, ...) is retried on the next run rather than kept forever, but
    only where the chain reaches its scorer: without ``full_scoring`` the chain stops at the first drop, so
    an error behind an earlier scorer whose stored score drops the rewrite (a threshold tightened since)
    would be selected on every run and never rescored. ``first_drop`` is that earlier scorer, judged like
    ``Chain.run`` judges stored scores; a scorer not stored yet may pass when scored, so it blocks nothing.
    """
    if not chain.scorers:
        return "FALSE", ""
    keys = ", ".join(f"({k}, {sql_str(s.name)}, {sql_str(s.version)})" for k, s in enumerate(chain.scorers))
    applies = " ".join(
        f"WHEN {k} THEN {s.applies_sql('w.task_type', 'w.n_images')}" for k, s in enumerate(chain.scorers)
    )
    drops = " ".join(
        f"WHEN {k} THEN NOT ({s.passes_sql('sc.score', 'sc.details')})" for k, s in enumerate(chain.scorers)
    )
    cte = f""",
keys(k, scorer, scorer_version) AS (VALUES {keys}),
err AS (
    SELECT sc.rewrite_id,
        min(keys.k) FILTER (WHERE sc.score IS NULL) AS first_error,
        min(keys.k) FILTER (WHERE sc.score IS NOT NULL AND (CASE keys.k {drops} END)) AS first_drop
    FROM scores sc JOIN keys USING (scorer, scorer_version) JOIN w ON w.rewrite_id = sc.rewrite_id
    WHERE (CASE keys.k {applies} END) AND sc.rewrite_id IN (
        SELECT e.rewrite_id FROM scores e WHERE e.score IS NULL AND {_version_filter(chain, "e")})
    GROUP BY sc.rewrite_id
)"""
    if full_scoring:  # every applicable scorer runs: every error is retried
        return "err.first_error IS NOT NULL", cte
    return f"coalesce(err.first_error < coalesce(err.first_drop, {len(chain.scorers)}), FALSE)", cte


def preview(con, chain: Chain, scope: str | None = None) -> dict[str, Any]:
    """What ``rethreshold`` would decide, against the latest decisions, without writing: a read-only connection
    will do. Tuning thresholds this way leaves no decision rows behind (each real re-decision stores one per
    rewrite, and the latest wins)."""
    scope = scope or DECIDED
    rows = con.execute(f"""
        WITH new AS ({decide_sql(chain, scope=scope)})
        SELECT s.source, c.kept AS kept_now, c.dropped_by AS by_now, n.kept AS kept_new, n.dropped_by AS by_new,
            count(*) AS n
        FROM new n
        JOIN rewrites r ON r.rewrite_id = n.rewrite_id JOIN samples s ON s.sample_id = r.sample_id
        LEFT JOIN latest_decisions c ON c.rewrite_id = n.rewrite_id
        GROUP BY ALL
    """).fetchall()  # fmt: skip
    out: dict[str, Any] = {"settings_hash": chain.settings_hash, "decided": 0, "kept_now": 0, "kept_new": 0,
                           "now_kept": {}, "now_dropped": {}, "by_source": {}, "dropped_by": {}}  # fmt: skip
    for source, kept_now, by_now, kept_new, by_new, n in rows:
        out["decided"] += n
        out["kept_now"] += n if kept_now else 0
        out["kept_new"] += n if kept_new else 0
        if kept_now and not kept_new:  # kept now, dropped under these thresholds: by which scorer
            out["now_kept"][by_new] = out["now_kept"].get(by_new, 0) + n
        if kept_new and not kept_now:  # dropped now (by which scorer), kept under these thresholds
            key = by_now or "undecided"
            out["now_dropped"][key] = out["now_dropped"].get(key, 0) + n
        if not kept_new:
            out["dropped_by"][by_new] = out["dropped_by"].get(by_new, 0) + n
        now, new = out["by_source"].get(source, (0, 0))
        out["by_source"][source] = (now + (n if kept_now else 0), new + (n if kept_new else 0))
    return out
