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
    "rewrites": "SELECT * FROM rewrites WHERE sample_id = $id ORDER BY created_at, attempt, rewrite_id",
    "models": "SELECT * FROM models WHERE model_id IN (SELECT model_id FROM rewrites WHERE sample_id = $id) "
    "ORDER BY created_at, model_id",
    "scores": "SELECT sc.* FROM scores sc JOIN rewrites r USING (rewrite_id) WHERE r.sample_id = $id "
    "ORDER BY sc.created_at, sc.scorer",
    "decisions": "SELECT d.* REPLACE (coalesce(d.thresholds, ds.thresholds) AS thresholds) FROM decisions d "
    "JOIN rewrites r ON r.rewrite_id = d.rewrite_id "
    "LEFT JOIN decision_settings ds ON ds.settings_hash = d.settings_hash WHERE r.sample_id = $id "
    "ORDER BY d.decided_at",
    "exports": "SELECT e.*, ei.rewrite_id FROM export_items ei JOIN exports e USING (export_id) "
    "WHERE ei.sample_id = $id ORDER BY e.created_at",
    # every run that wrote a fact above, the filter and export runs and the rewriters' training runs included
    "runs": "WITH rw AS (SELECT rewrite_id, model_id, run_id FROM rewrites WHERE sample_id = $id) "
    "SELECT * FROM runs WHERE run_id IN ("
    "SELECT run_id FROM samples WHERE sample_id = $id UNION SELECT run_id FROM pairs WHERE sample_id = $id "
    "UNION SELECT run_id FROM rw "
    "UNION SELECT created_by_run FROM models WHERE model_id IN (SELECT model_id FROM rw) "
    "UNION SELECT run_id FROM scores WHERE rewrite_id IN (SELECT rewrite_id FROM rw) "
    "UNION SELECT run_id FROM decisions WHERE rewrite_id IN (SELECT rewrite_id FROM rw) "
    "UNION SELECT e.run_id FROM exports e JOIN export_items ei USING (export_id) WHERE ei.sample_id = $id) "
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
       round(epoch(coalesce(r.finished_at, CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)) - r.started_at), 1)
           AS seconds,
       r.code_version, r.summary, {outcome}
FROM runs r ORDER BY r.started_at DESC LIMIT $limit
"""


def recent_runs(store: LineageStore, limit: int = 20) -> list[dict[str, Any]]:
    """The latest runs. One still marked running whose process is gone reads as interrupted at once (the next
    run on its host records it so, flows/common.py), with no duration: when it stopped is not known."""
    with store.reader() as con:
        # a reader cannot migrate: on a database older than these columns (011) they read as NULL
        have = {row[0] for row in con.execute("DESCRIBE runs").fetchall()}
        outcome = ", ".join(f"r.{c}" if c in have else f"NULL AS {c}" for c in ("error", "host", "pid"))
        sql = RECENT_RUNS_SQL.format(outcome=outcome)
        rows = [_decode(r) for r in con.sql(sql, params={"limit": limit}).to_arrow_table().to_pylist()]
    for row in rows:
        if row["status"] == "running" and has_ended(row["host"], row["pid"]):
            row.update(status="interrupted", seconds=None, error=row["error"] or INTERRUPTED)
    return rows
