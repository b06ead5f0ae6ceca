"""The export flow: select kept rewrites from the lineage, gate on SQL checks, write formats, record, report.

One task per format (a format is the export's "shard"); the flow alone reads and writes DuckDB. The
export id is a hash of the selection SQL (with `export.dedupe`'s duplicate dropping, when on), the format, the
selected content (sample, rewrite, output, scores) and whatever else changes the folder's files (the layout
version, the images mode of the JSON layouts, the parquet shard size), so the same selection exported twice
lands in the same folder and the second time only rewrites the dataset card. Every run records the folders it
published in `export_runs`, and its summary the selection's duplicate counts (tasks/export_dedupe.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from flows.common import logger, map_shards, stage_run, utcnow
from lineage.store import LineageStore, check_read_only_sql
from polite.config import resolve_config
from polite.config.export import ExportChecks, ExportSettings
from polite.errors import UserError
from polite.ids import stable_hash
from polite.shards import write_table_atomic
from polite.workspace import Workspace

DEFAULT_PREDICATE = "kept"

# One row per selected sample: the lineage view's latest rewrite and decision, the scores the published
# layouts need, and the image paths in instruction order.
_SELECTION_SQL = """
WITH picked AS (
    SELECT * FROM lineage WHERE rewrite_status = 'ok' AND ({predicate})
),
image_paths AS (
    SELECT u.sample_id, list(i.path ORDER BY u.pos) AS image_paths
    FROM (SELECT sample_id, unnest(images) AS image_id, generate_subscripts(images, 1) AS pos
          FROM samples WHERE sample_id IN (SELECT sample_id FROM picked)) u
    JOIN images i USING (image_id)
    GROUP BY u.sample_id
),
extra AS (
    SELECT rewrite_id, arg_max(details, created_at) FILTER (WHERE scorer = 'clipscore') AS clip_details
    FROM scores WHERE rewrite_id IN (SELECT rewrite_id FROM picked) GROUP BY rewrite_id
)
SELECT p.sample_id, p.rewrite_id, p.model_id, p.source, p.split, p.task_type, p.instruction, p.raw_response,
    coalesce(p.final_output, p.rewrite) AS output, p.rewrite,
    p.kept, p.reward, p.raw_reward, p.semantic, p.nli, p.clipscore, p.rouge, e.clip_details,
    coalesce(ip.image_paths, []::VARCHAR[]) AS image_paths
FROM picked p
LEFT JOIN image_paths ip USING (sample_id)
LEFT JOIN extra e USING (rewrite_id)
ORDER BY p.sample_id
"""


class ExportCheckFailed(UserError, ValueError):
    """A publishing gate failed; nothing was written. The message names the check and the numbers."""


def selection_sql(where: str | None) -> str:
    """The full SELECT for a ``--where`` predicate over the ``lineage`` view (default: ``kept``)."""
    predicate = (where or DEFAULT_PREDICATE).strip().rstrip(";")
    sql = _SELECTION_SQL.format(predicate=predicate)
    check_read_only_sql(sql)  # one SELECT only: a predicate cannot smuggle in a second statement
    return sql


def select(store: LineageStore, sql: str) -> pa.Table:
    """Run the selection read-only and without file access (the predicate is user text)."""
    with store.reader(sandboxed=True) as con:
        return con.sql(sql).to_arrow_table()


def _named(found: list[tuple[str, list[str]]], one: str, many: str) -> str:
    """Up to five ``sample (what, ...)`` names and how many more: a check's failure stays one line. ``one``,
    ``many``: the verb phrase for one item, for several."""
    named = ", ".join(f"{sid} ({', '.join(map(str, items))})" for sid, items in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return f"{len(found)} selected {'item ' + one if len(found) == 1 else 'items ' + many}: {named}{more}"


def run_checks(
    store: LineageStore, selection: pa.Table, checks: ExportChecks, notes: dict[str, str] | None = None
) -> list[str]:
    """The publishing gates, in SQL; returns one line per failed check (empty: publish). ``notes`` gets each
    threshold check's outcome for the dataset card: passed, off, or why it was skipped."""
    failed: list[str] = []
    notes = {} if notes is None else notes
    for name, bound in checks.model_dump().items():
        notes[name] = "off" if bound is None or bound is False else f"passed (`{bound}`)"
    with store.reader() as con:
        con.register("selection", selection)
        n_items = selection.num_rows
        if n_items < checks.min_items:
            failed.append(f"min_items: {n_items} items to export, need at least {checks.min_items}")
        if checks.min_keep_rate is not None:
            decided, kept = con.execute(
                "SELECT count(*), count(*) FILTER (WHERE kept) FROM lineage WHERE kept IS NOT NULL"
            ).fetchall()[0]
            rate = kept / decided if decided else 0.0
            if rate < checks.min_keep_rate:
                failed.append(
                    f"keep_rate: {kept} of {decided} decided rewrites kept ({rate:.1%}), "
                    f"below export.checks.min_keep_rate = {checks.min_keep_rate:.1%}"
                )
        if checks.min_median_reward_gain is not None:
            n, gain = con.execute(
                "SELECT count(*), median(reward - raw_reward) FROM selection "
                "WHERE reward IS NOT NULL AND raw_reward IS NOT NULL"
            ).fetchall()[0]
            if not n:  # not a pass: the card must not claim it
                notes["min_median_reward_gain"] = "skipped: no selected item has both rewards"
            elif gain < checks.min_median_reward_gain:
                failed.append(
                    f"median_reward_gain: median(reward - raw_reward) = {gain:.3f} over {n} items, "
                    f"below export.checks.min_median_reward_gain = {checks.min_median_reward_gain}"
                )
        if checks.no_empty_outputs:
            (empty,) = con.execute(
                "SELECT count(*) FROM selection WHERE output IS NULL OR trim(output) = ''"
            ).fetchall()[0]
            if empty:
                failed.append(f"no_empty_outputs: {empty} selected items have an empty output")
        # Not a threshold, so never off: an image id without its `images` row has no path, and the sample
        # would be exported without that image (its `<image>` marker then points at another, or at none).
        lost = con.execute(
            "SELECT u.sample_id, list(DISTINCT u.image_id ORDER BY u.image_id) AS ids FROM "
            "(SELECT sample_id, unnest(images) AS image_id FROM samples "
            " WHERE sample_id IN (SELECT sample_id FROM selection)) u "
            "WHERE u.image_id NOT IN (SELECT image_id FROM images) GROUP BY u.sample_id ORDER BY u.sample_id"
        ).fetchall()
        if lost:
            failed.append(
                "images: "
                + _named(lost, *(f"{verb} image ids with no row in `images`" for verb in ("references", "reference")))
                + "; re-ingest their source, or leave them out with --where"
            )
        con.unregister("selection")
    return failed


def file_checks(located: pa.Table, settings: ExportSettings) -> list[str]:
    """Gates on what the writers will read, run before any folder is made: the image files (a stat each,
    for the formats that open them) and, for llava, ``<image>`` markers that match the image count."""
    from tasks.export import image_marker_mismatch, missing_image_files, reads_images

    failed: list[str] = []
    if any(reads_images(fmt, settings.images) for fmt in settings.formats):
        gone = missing_image_files(located)
        if gone:
            failed.append("image files: " + _named(gone, "references missing image files", "reference missing image files")
                          + "; restore the files (or re-ingest their source), or leave them out with --where")  # fmt: skip
    if "llava" in settings.formats:
        rows = located.select(["sample_id", "instruction", "image_paths"]).to_pylist()
        odd = [(r["sample_id"], [why]) for r in rows
               if (why := image_marker_mismatch(r["instruction"], len(r["image_paths"] or [])))]  # fmt: skip
        if odd:
            failed.append("llava: " + _named(odd, *["cannot pair <image> markers with images"] * 2)
                          + "; fix their instructions at ingest, or leave them out with --where")  # fmt: skip
    return failed


def content_digest(selection: pa.Table) -> str:
    """Hash of what is exported: ids, outputs and scores of every selected row, in id order."""
    digest = hashlib.blake2b(digest_size=16)
    keep = [c for c in selection.column_names if c not in ("image_paths",)]
    for row in selection.select(keep).to_pylist():
        digest.update(json.dumps(row, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def export_id_for(sql: str, fmt: str, digest: str, images: str = "link", shard_bytes: int | None = None) -> str:
    """The folder's id: everything that changes its files. The images mode matters only to the JSON layouts
    (the others embed the bytes) and the shard size only to parquet, so neither splits the other formats."""
    from tasks.export import EMBEDS_IMAGES, LAYOUT_VERSION

    layout = {"version": LAYOUT_VERSION}
    if fmt not in EMBEDS_IMAGES:
        layout["images"] = images
    if fmt == "parquet":
        layout["shard_bytes"] = shard_bytes
    return "x_" + stable_hash("export", sql, fmt, digest, json.dumps(layout, sort_keys=True))


def _settings(cfg_export: ExportSettings, formats, where, push_to_hub, dedupe=None) -> ExportSettings:
    update: dict[str, Any] = {}
    if formats:
        update["formats"] = [formats] if isinstance(formats, str) else list(formats)
    if where is not None:
        update["where"] = where
    if push_to_hub is not None:
        update["push_to_hub"] = push_to_hub
    if dedupe is not None:
        update["dedupe"] = dedupe
    settings = ExportSettings.model_validate({**cfg_export.model_dump(), **update})
    if settings.push_to_hub and "parquet" not in settings.formats:
        # The Hub's dataset viewer and `load_dataset(repo)` read parquet under data/.
        settings = settings.model_copy(update={"formats": [*settings.formats, "parquet"]})
    return settings


def _warn_not_kept(log, selection: pa.Table, where: str | None) -> None:
    """A ``--where`` may select rewrites the filters dropped (on purpose or not): say how many it did."""
    kept = pc.sum(pc.fill_null(selection["kept"], False).cast(pa.int64())).as_py() or 0
    not_kept = selection.num_rows - kept
    if not_kept:
        log.warning("export --where %r selects %d item(s) the filter chain did not keep (of %d)",
                    where, not_kept, selection.num_rows)  # fmt: skip


def record_export(store: LineageStore, ws: Workspace, job: dict, manifest: dict, run_id: str, sql: str,
                  items: pa.Table) -> None:  # fmt: skip
    """The folder's `exports` row and its `export_items` (kept as first written when the folder is reused)."""
    with store.writer() as con:
        store.ingest_arrow("exports", pa.table({
            "export_id": [job["export_id"]], "format": [job["format"]], "path": [ws.stored(job["out_dir"])],
            "run_id": [run_id], "selection": [sql], "n_items": [manifest["n_items"]],
        }), con=con)  # fmt: skip
        store.ingest_arrow("export_items", items.append_column(
            "export_id", pa.array([job["export_id"]] * items.num_rows, pa.string())), con=con)  # fmt: skip


def record_publication(store: LineageStore, run_id: str, export_ids: list[str]) -> None:
    """The run published these folders (new or reused): what `polite diff` and "the latest export" read."""
    # a plain insert: lineage/store.py's TABLE_KEYS (what ingest_arrow accepts) predates this table
    with store.writer() as con:
        con.executemany(
            "INSERT OR IGNORE INTO export_runs (run_id, export_id, published_at) VALUES (?, ?, ?)",
            [(run_id, export_id, utcnow()) for export_id in export_ids],
        )


@flow(name="export")
def export_flow(
    config: dict | str | None = None,
    workspace: str | None = None,
    parent_run_id: str | None = None,
    formats: list[str] | str | None = None,
    where: str | None = None,
    push_to_hub: str | None = None,
    dedupe: str | None = None,
) -> dict:
    """Export the kept rewrites (or a ``where`` selection over the lineage view) and write the report.
    ``dedupe`` (none, exact, response) replaces ``export.dedupe``: which duplicate items to drop."""
    import tasks.export as texport
    import tasks.export_hub as export_hub
    from tasks.export_card import card_facts, dataset_card
    from tasks.export_dedupe import deduped_selection_sql, drop_duplicates, repeat_warning
    from tasks.report import write_report

    cfg = resolve_config(config)
    settings = _settings(cfg.export, formats, where, push_to_hub, dedupe)
    if settings.where:
        db_path = Workspace.resolve(workspace or cfg.workspace).db_path
        LineageStore(db_path).check_predicate(settings.where, "lineage", "export.where (--where)")
    if settings.push_to_hub:  # before the run is recorded and anything is written
        export_hub.check_hub_push(settings.push_to_hub)
    base_sql = selection_sql(settings.where)  # what runs: one row per selected sample
    sql = deduped_selection_sql(base_sql, settings.dedupe)  # what is recorded and hashed: the items exported
    shard_bytes = texport.SHARD_BYTES  # read now: part of the parquet export id
    with stage_run("export", cfg.model_dump(mode="json"), workspace or cfg.workspace, parent_run_id) as run:
        ws, store, log = run.workspace, run.store, logger()
        selection, duplicates = drop_duplicates(select(store, base_sql), settings.dedupe)
        run.summary.update(duplicates.summary())  # a run held by a check below still records them
        repeats = repeat_warning(duplicates)
        if repeats:
            log.warning("export: %s", repeats)
        _warn_not_kept(log, selection, settings.where)
        notes: dict[str, str] = {}
        located = ws.locate_paths(selection, "image_paths")  # the writers read the images: where they are now
        failures = run_checks(store, selection, settings.checks, notes) + file_checks(located, settings)
        if duplicates.dropped:  # the checks saw the items left after dedupe: say so, or "43 items" reads wrong
            failures = [f"{line} (after export.dedupe: {settings.dedupe} dropped {duplicates.dropped:,} of "
                        f"{duplicates.selected:,} selected)" if line.startswith("min_items") else line
                        for line in failures]  # fmt: skip
        digest = content_digest(selection)

        def report(prefix: str) -> str | None:
            if settings.report == "none":
                return None
            folder = ws.url("reports", f"{prefix}-{digest[:12]}")
            return write_report(
                store, folder, settings.report, n_cards=settings.sample_cards, selection=selection, workspace=ws
            )

        if failures:
            # The report shows why (funnel, score histograms, dropped examples) even when nothing is published.
            held = report("held")
            raise ExportCheckFailed(
                "export stopped by failed check(s):\n  - "
                + "\n  - ".join(failures)
                + (f"\nreport: {held}" if held else "")
            )
        # the stored (workspace-relative) paths ride along: `images: none` names them
        selection_url = write_table_atomic(
            located.append_column("stored_paths", selection["image_paths"]),
            ws.url("shards", "exports", f"selection-{digest}.parquet"),
        )
        facts = card_facts(store, sql, selection, duplicates)
        jobs = []
        for fmt in settings.formats:
            export_id = export_id_for(sql, fmt, digest, settings.images, shard_bytes)
            jobs.append({
                "export_id": export_id, "format": fmt, "out_dir": ws.url("exports", f"{fmt}-{export_id}"),
                "card": dataset_card(facts, settings, fmt, notes),
            })  # fmt: skip
        items = selection.select(["sample_id", "rewrite_id"])
        exports: dict[str, dict] = {}

        def record(manifest: dict) -> None:
            job = next(j for j in jobs if j["out_dir"] == manifest["path"])
            record_export(store, ws, job, manifest, run.run_id, sql, items)
            exports[job["format"]] = {
                "export_id": job["export_id"],
                "path": job["out_dir"],
                "n_items": manifest["n_items"],
            }

        map_shards(
            texport.write_export_task,
            jobs,
            record,
            "export",
            selection_url=selection_url,
            images=settings.images,
            shard_bytes=shard_bytes,
        )
        record_publication(store, run.run_id, [j["export_id"] for j in jobs])
        report_path = report("export")
        run.summary.update({"n_items": selection.num_rows, "formats": sorted(exports), "report": report_path})
        hub_url = None
        if settings.push_to_hub:
            hub_url = export_hub.push_folder_to_hub(exports["parquet"]["path"], settings.push_to_hub, settings.private)
            log.info("pushed %s to %s", exports["parquet"]["path"], hub_url)
        return {
            "run_id": run.run_id,
            "n_items": selection.num_rows,
            "selection": sql,
            "exports": exports,
            "report": report_path,
            "hub_url": hub_url,
            **duplicates.summary(),
            "duplicates": duplicates.as_dict(),
            "duplicate_warning": repeats,
        }
