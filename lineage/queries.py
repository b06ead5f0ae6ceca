"""Canned read-only queries behind `polite explain` and `polite runs`."""

from __future__ import annotations

import json
from typing import Any

import duckdb

from lineage.store import LineageStore
from polite.processes import INTERRUPTED, has_ended
from polite.workspace import Workspace

_EXPLAIN_PARTS: dict[str, str] = {
    "sample": "SELECT * FROM samples WHERE sample_id = $id",
    # in instruction order (the n-th <image> marker is the n-th image); an id missing from the image store is
    # listed with no path rather than left out: the export refuses such a sample, and this says why
    "images": "SELECT u.image_id, i.* EXCLUDE (image_id) FROM (SELECT unnest(images) AS image_id, "
    "generate_subscripts(images, 1) AS pos FROM samples WHERE sample_id = $id) u "
    "LEFT JOIN images i USING (image_id) ORDER BY u.pos",
    "pairs": "SELECT * FROM pairs WHERE sample_id = $id ORDER BY created_at, pair_id",
    # current: the rewrite the lineage view reads (the latest ok one), and its latest decision
    "rewrites": "SELECT *, rewrite_id IN (SELECT rewrite_id FROM latest_rewrites WHERE sample_id = $id) AS current "
    "FROM rewrites WHERE sample_id = $id ORDER BY created_at, attempt, rewrite_id",
    "models": "SELECT * FROM models WHERE model_id IN (SELECT model_id FROM rewrites WHERE sample_id = $id) "
    "ORDER BY created_at, model_id",
    "scores": "SELECT sc.* FROM scores sc JOIN rewrites r USING (rewrite_id) WHERE r.sample_id = $id "
    "ORDER BY sc.created_at, sc.scorer",
    "decisions": "SELECT d.* REPLACE (coalesce(d.thresholds, ds.thresholds) AS thresholds), d.decision_id IN ("
    "SELECT decision_id FROM latest_decisions WHERE rewrite_id IN (SELECT rewrite_id FROM latest_rewrites "
    "WHERE sample_id = $id)) AS current FROM decisions d JOIN rewrites r ON r.rewrite_id = d.rewrite_id "
    "LEFT JOIN decision_settings ds ON ds.settings_hash = d.settings_hash WHERE r.sample_id = $id "
    "ORDER BY d.decided_at",
    # published_by: every export run that published the folder, the ones that found it done and reused it too
    # (export_runs); exports.run_id is only the run that wrote it
    "exports": "SELECT e.*, ei.rewrite_id, (SELECT list(p.run_id ORDER BY p.published_at, p.run_id) "
    "FROM export_runs p WHERE p.export_id = e.export_id AND p.run_id <> p.export_id) AS published_by "
    "FROM export_items ei JOIN exports e USING (export_id) WHERE ei.sample_id = $id ORDER BY e.created_at",
    # every run that wrote a fact above, the filter and export runs and the rewriters' training runs included
    "runs": "WITH rw AS (SELECT rewrite_id, model_id, run_id FROM rewrites WHERE sample_id = $id) "
    "SELECT * FROM runs WHERE run_id IN ("
    "SELECT run_id FROM samples WHERE sample_id = $id UNION SELECT run_id FROM pairs WHERE sample_id = $id "
    "UNION SELECT run_id FROM rw "
    "UNION SELECT created_by_run FROM models WHERE model_id IN (SELECT model_id FROM rw) "
    "UNION SELECT run_id FROM scores WHERE rewrite_id IN (SELECT rewrite_id FROM rw) "
    "UNION SELECT run_id FROM decisions WHERE rewrite_id IN (SELECT rewrite_id FROM rw) "
    "UNION SELECT e.run_id FROM exports e JOIN export_items ei USING (export_id) WHERE ei.sample_id = $id "
    "UNION SELECT p.run_id FROM export_runs p JOIN export_items ei USING (export_id) WHERE ei.sample_id = $id) "
    "ORDER BY started_at, run_id",
}


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, str) and key in {"meta", "params", "settings", "details", "thresholds", "config", "summary"}:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def explain(store: LineageStore, sample_id: str, workspace: Workspace | None = None) -> dict[str, Any]:
    """Everything known about one sample, stage by stage. Raises KeyError for an unknown id. With the
    ``workspace``, each image also says where its ``file`` is now (paths are stored relative to the workspace)."""
    report: dict[str, Any] = {}
    with store.reader() as con:
        for part, sql in _EXPLAIN_PARTS.items():
            try:
                rows = con.sql(sql, params={"id": sample_id}).to_arrow_table().to_pylist()
            except duckdb.CatalogException as exc:
                upgrade = store.not_upgraded(con)
                if upgrade is None:
                    raise
                raise upgrade from exc
            report[part] = [_decode(r) for r in rows]
    if not report["sample"]:
        raise KeyError(f"no sample with id {sample_id!r} in {store.db_path}")
    report["sample"] = report["sample"][0]
    if workspace is not None:
        report["images"] = [{**r, "file": workspace.locate(r.get("path"))} for r in report["images"]]
    return report


# runs.started_at/finished_at are naive UTC (flows.common.utcnow): a running run is timed against UTC now. Every
# store connection sets TimeZone = 'UTC', so now()::TIMESTAMP is UTC too; AT TIME ZONE 'UTC' keeps the query right
# on a connection that did not set it
RECENT_RUNS_SQL = """
SELECT r.run_id, r.flow, r.status, r.started_at, r.finished_at,
       -- a running run is timed to now; one interrupted without an end time (its process died) has no duration
       round(epoch(coalesce(r.finished_at, CASE WHEN r.status = 'running'
                                                THEN CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP) END) - r.started_at), 1)
           AS seconds,
       r.code_version, r.summary, {outcome}
FROM runs r WHERE ($flow IS NULL OR r.flow = $flow) AND ($stored IS NULL OR list_contains($stored, r.status))
ORDER BY r.started_at DESC LIMIT $fetch
"""
RUN_STATUSES = ("running", "completed", "failed", "interrupted")
# the flows that record runs (flows/*.py, stage_run)
FLOWS = ("factory", "ingest", "distort", "train_rewriter", "rewrite", "filter", "export")


def recent_runs(
    store: LineageStore, limit: int = 20, flow: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """The latest runs, of one ``flow`` and in one ``status`` if given. One still marked running whose process is
    gone reads as interrupted at once (the next run on its host records it so, flows/common.py), with no
    duration: when it stopped is not known."""
    if status is not None and status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}; one of {', '.join(RUN_STATUSES)}")
    # a row stored as running may read as interrupted: those two are fetched together and told apart below
    stored = None if status is None else ["running", "interrupted"] if status in ("running", "interrupted") else [status]
    with store.reader() as con:
        # a reader cannot migrate: on a database older than these columns (011) they read as NULL
        have = {row[0] for row in con.execute("DESCRIBE runs").fetchall()}
        outcome = ", ".join(f"r.{c}" if c in have else f"NULL AS {c}" for c in ("error", "host", "pid"))
        sql = RECENT_RUNS_SQL.format(outcome=outcome)
        params = {"flow": flow, "stored": stored, "fetch": limit if stored is None else 1 << 31}
        rows = [_decode(r) for r in con.sql(sql, params=params).to_arrow_table().to_pylist()]
        if flow is not None and not rows:
            _check_flow_name(con, flow)
    for row in rows:
        if row["status"] == "running" and has_ended(row["host"], row["pid"]):
            row.update(status="interrupted", seconds=None, error=row["error"] or INTERRUPTED)
        row["left_s"] = _time_left(row)
    return [r for r in rows if status is None or r["status"] == status][:limit]


def _check_flow_name(con, flow: str) -> None:
    """A ``--flow`` that names no flow ever run here is a typo more often than a flow yet to run: say so."""
    from polite.config.names import unknown_names

    known = {r[0] for r in con.execute("SELECT DISTINCT flow FROM runs").fetchall()} | set(FLOWS)
    problem = unknown_names([flow], known, "flow")
    if problem:
        raise ValueError(f"--flow: {problem}")


def _time_left(row: dict[str, Any]) -> float | None:
    """Seconds a running run has left at the pace of its shards so far (flows/common.py writes the progress)."""
    summary = row["summary"] if isinstance(row["summary"], dict) else {}
    done, total = summary.get("shards_done"), summary.get("shards_total")
    if row["status"] != "running" or not done or not total or row["seconds"] is None:
        return None
    return round(row["seconds"] * (total - done) / done, 1)


# -- what changed between two exports (the export_diff macro of views.sql) ----------------------------------
# a side is an export id (its row) or an export run id: the folders that run published, written by it or
# reused from an earlier run (export_runs, migration 012); a run's formats hold the same items
EXPORT_SIDES_SQL = """
WITH side AS (
    SELECT coalesce(e.run_id, e.export_id) AS ref, e.run_id, e.export_id, e.format, e.n_items, e.created_at
    FROM exports e WHERE e.export_id = $ref
    UNION ALL
    SELECT p.run_id, p.run_id, e.export_id, e.format, e.n_items, p.published_at
    -- an export from before export runs was backfilled under its own id (run_id = export_id): one side, not two
    FROM export_runs p JOIN exports e USING (export_id) WHERE p.run_id = $ref AND p.run_id <> p.export_id
)
SELECT ref, run_id, list(export_id ORDER BY format) AS export_ids, list(format ORDER BY format) AS formats,
    max(n_items) AS n_items, min(created_at) AS created_at
FROM side GROUP BY ALL
"""
# the runs that published last, reused folders included (a run that wrote nothing new is still the latest)
LATEST_EXPORT_RUNS_SQL = """
SELECT run_id AS ref FROM export_runs GROUP BY 1 ORDER BY max(published_at) DESC, 1 DESC LIMIT 2
"""
CHANGES = ("added", "removed", "rewritten", "redone", "recut", "same")
# why a sample published in a is not in b, read from the lineage now
REMOVED_WHY_SQL = """
CASE WHEN rewrite_now IS DISTINCT FROM rewrite_a AND kept_now IS NULL THEN 'rewritten since, not filtered yet'
     WHEN kept_now = false THEN 'dropped by ' || coalesce(dropped_by_now, 'a filter')
     WHEN kept_now AND rewrite_now IS DISTINCT FROM rewrite_a THEN 'rewritten since, kept, outside b'
     WHEN kept_now THEN 'kept, outside b''s selection'
     ELSE 'no decision now' END
"""


def _query(store: LineageStore, con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> list:
    """``sql``'s rows; a database older than the tables it reads says which command upgrades it."""
    try:
        return con.execute(sql, params or {}).fetchall()
    except duckdb.CatalogException as exc:
        upgrade = store.not_upgraded(con)
        if upgrade is None:
            raise
        raise upgrade from exc


def _export_side(store: LineageStore, con: duckdb.DuckDBPyConnection, ref: str) -> dict[str, Any]:
    _query(store, con, "SELECT 1 FROM export_runs LIMIT 0")  # an old database: say how to upgrade it
    rows = con.sql(EXPORT_SIDES_SQL, params={"ref": ref}).to_arrow_table().to_pylist()
    if not rows:
        raise KeyError(
            f"no export and no export run with id {ref!r}; the recent ones: polite sql \"SELECT run_id, export_id, "
            "format, n_items, created_at FROM exports ORDER BY created_at DESC\""
        )
    return rows[0]


def export_diff(store: LineageStore, a: str | None = None, b: str | None = None, show: int = 3) -> dict[str, Any]:
    """What changed from export ``a`` to ``b`` (export ids or export run ids; default: the two latest export
    runs, or ``a`` against the latest): counts per change and source, why removed samples are out now, and up
    to ``show`` examples of each change with both texts."""
    with store.reader() as con:
        if b is None:
            latest = [r[0] for r in _query(store, con, LATEST_EXPORT_RUNS_SQL)]
            if a is None and len(latest) < 2 or a is not None and not latest:
                raise KeyError("polite diff needs two exports to compare; this workspace has "
                               f"{len(latest)} export run(s). Export again after a change, then diff")  # fmt: skip
            a, b = (latest[1], latest[0]) if a is None else (a, latest[0])
        sides = {"a": _export_side(store, con, a), "b": _export_side(store, con, b)}
        # the macro reads exports.run_id, the run that wrote a folder: a run that reused its folders is passed as
        # one of the export ids it published (each of a run's formats holds the same items)
        refs = {"a": sides["a"]["export_ids"][0], "b": sides["b"]["export_ids"][0]}
        try:
            con.execute("CREATE TEMP TABLE _diff AS SELECT * FROM export_diff($a, $b)", refs)
        except duckdb.CatalogException as exc:
            upgrade = store.not_upgraded(con)
            raise (upgrade or KeyError("this workspace's views predate `polite diff`: any command that writes "
                                       "the lineage (polite filter, polite export, ...) re-creates them")) from exc  # fmt: skip
        rows = lambda sql: con.sql(sql).to_arrow_table().to_pylist()  # noqa: E731
        counts = {r["change"]: r["n"] for r in rows("SELECT change, count(*) AS n FROM _diff GROUP BY 1")}
        report = {
            **sides,
            "counts": {c: counts.get(c, 0) for c in CHANGES},
            "new_samples": rows("SELECT count(*) AS n FROM _diff WHERE change = 'added' AND new_sample")[0]["n"],
            "by_source": rows("PIVOT (SELECT source, change FROM _diff) ON change IN "
                              f"({', '.join(repr(c) for c in CHANGES)}) USING count(*) ORDER BY source"),  # fmt: skip
            "removed_why": rows(f"SELECT {REMOVED_WHY_SQL} AS why, count(*) AS n FROM _diff WHERE change = 'removed' "
                                "GROUP BY 1 ORDER BY 2 DESC, 1"),  # fmt: skip
            "examples": rows(
                "SELECT * FROM (SELECT d.change, d.sample_id, d.source, coalesce(d.final_a, ra.output) AS text_a, "
                "coalesce(d.final_b, rb.output) AS text_b, "
                "row_number() OVER (PARTITION BY d.change ORDER BY d.sample_id) AS k FROM _diff d "
                "LEFT JOIN rewrites ra ON ra.rewrite_id = d.rewrite_a LEFT JOIN rewrites rb ON rb.rewrite_id = d.rewrite_b "
                f"WHERE d.change <> 'same') WHERE k <= {int(show)} ORDER BY change, sample_id"
            ),
        }
    for example in report["examples"]:
        example.pop("k")
    return report
