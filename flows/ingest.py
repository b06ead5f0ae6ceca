"""The ingest flow: sources -> samples and images in the lineage, one Prefect task per shard."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import logger, map_shards, stage_run
from polite.config import ConfigError, SourceSpec, resolve_config
from polite.workspace import Workspace
from tasks.ingest import ingest_shard_task, plan_source
from tasks.sources import get_adapter

COUNTS = ("ok", "failed", "skipped", "duplicates")
# The summary names at most this many of a source's repeated sample ids; the lineage holds them all
# (samples.duplicate_of).
MAX_DUPLICATE_IDS = 20
# Finished shards are loaded into DuckDB in batches: each writer session costs ~50-100 ms of open/close,
# so one per 2000-row shard would dominate. The lineage lags the shards by at most this much.
FLUSH_ROWS = 20_000
FLUSH_SECONDS = 5.0


def _specs(cfg, sources: list[dict] | None) -> list[SourceSpec]:
    if sources is None:
        return list(cfg.ingest.sources)
    from pydantic import ValidationError

    from polite.config import format_validation_error

    specs = []
    for i, source in enumerate(sources):
        try:
            specs.append(SourceSpec.model_validate(source))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"(sources[{i}])")) from None
    return specs


class LineageBatcher:
    """Loads finished shards into DuckDB in batches (one short writer session each) and keeps the counts."""

    def __init__(self, store, run_id: str, counts: dict[str, dict[str, Any]]):
        self.store, self.run_id, self.counts = store, run_id, counts
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, result: dict) -> None:
        for key in COUNTS:
            self.counts[result["source"]][key] += int(result.get(key, 0))
        self.pending.append(result)
        rows = sum(r["ok"] + r["failed"] for r in self.pending)
        if rows >= FLUSH_ROWS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        groups: dict[str, list[dict]] = {}
        for r in self.pending:
            groups.setdefault(r["source"], []).append(r)
        with self.store.writer() as con:
            for label, results in groups.items():  # DuckDB reads the shard files itself
                self.counts[label]["new_images"] += self.store.ingest_parquet("images", [r["images"] for r in results], con=con)
            shards = [r["samples"] for r in self.pending]
            # A sample that failed before (a corrupt image, say) and is ok in these shards, because the source
            # was fixed, is replaced; ok samples are never touched (ingest stays idempotent on sample_id).
            self.store.replace_failed("samples", "sample_id", shards, con=con, same_row="source_row")
            # A key that repeats in a source: the first row keeps the sample id, each later row is recorded as a
            # failed duplicate; its row moves from the ok/failed count it was counted under to `duplicates`.
            duplicates = self.store.ingest_samples(shards, self.run_id, con=con)
            # rows inserted just now are the only ones without a run: count them, then stamp them
            fresh = con.execute(
                "SELECT source, count(*) FROM samples WHERE run_id IS NULL AND duplicate_of IS NULL GROUP BY source"
            ).fetchall()
            con.execute("UPDATE samples SET run_id = ? WHERE run_id IS NULL", [self.run_id])
        for label, status, kept, stored in duplicates:
            if label in self.counts:
                counts = self.counts[label]
                counts[status if status in ("ok", "failed") else "failed"] -= 1
                counts["duplicates"] += 1
                counts["new_samples"] -= stored  # a row this run stored, now a duplicate record
                # the smallest ids, so the list does not depend on the order shards finished in
                ids = counts.get("duplicate_ids", [])
                counts["duplicate_ids"] = sorted({*ids, kept})[:MAX_DUPLICATE_IDS]
        for label, n in fresh:
            if label in self.counts:
                self.counts[label]["new_samples"] += n
        self.pending.clear()
        self.last_flush = time.monotonic()


def print_summary(summary: dict[str, Any]) -> None:
    """What landed, per source, as a rich table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    from polite.printing import print_wide

    table = Table(title="ingest: what landed")
    keys = ("rows", "ok", "failed", "skipped", "duplicates", "new_samples", "new_images")
    for column in ("source", "rows read", "ok", "failed", "skipped", "duplicates", "new samples", "new images"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for label, c in summary["sources"].items():
        table.add_row(label, *[str(c.get(k, 0)) for k in keys])
    console = Console()
    print_wide(table, console)  # piped or in CI: every column whole (rich would cut them at 80 columns)
    for label, c in summary["sources"].items():
        if c.get("duplicates"):
            console.print(
                f"{label}: {c['duplicates']} row(s) repeat a key of an earlier row; the first row keeps the sample "
                f"id ({', '.join(c['duplicate_ids'])}{', ...' if len(c['duplicate_ids']) >= MAX_DUPLICATE_IDS else ''}). "
                f"polite sql \"SELECT duplicate_of, source_row, error FROM samples WHERE duplicate_of IS NOT NULL\""
            )


# Bounded by default (Prefect's own default is unbounded threads, so memory would grow with the number of
# shards); the factory and the CLI swap in the runner of config.runner with ``with_options``.
@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=2))
def ingest_flow(
    config: dict | str | None = None,
    workspace: str | None = None,
    parent_run_id: str | None = None,
    sources: list[dict] | None = None,
    retry_failed: bool = False,
) -> dict:
    """Ingest ``sources`` (default: ``config.ingest.sources``) into the workspace's samples and images tables.

    Every source is opened and its columns checked before any shard runs. Re-running gives the same sample ids
    and adds nothing; a run that stopped part-way resumes (finished shards are reused). ``retry_failed`` reads
    the finished shards that hold failed samples again (after fixing image files: they are not part of a
    shard's fingerprint), and failed samples that now map replace their failed records.
    """
    cfg = resolve_config(config)
    specs = _specs(cfg, sources)
    cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"sources": specs})})
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):  # checked before any source is opened (a Hub load, the demo's generation)
        raise ConfigError(f"two sources share a label {labels}: give each a distinct `name`")
    for spec in specs:  # adapter options and mappings, before the workspace is made or a source opened
        get_adapter(spec)
    ws = Workspace.resolve(workspace or cfg.workspace).ensure()
    plans = [plan_source(spec, ws.root, cfg.ingest.shard_size, retry_failed) for spec in specs]

    summary: dict[str, Any] = {"sources": {}}
    for plan in plans:
        summary["sources"][plan.label] = {"adapter": plan.adapter, "from": plan.origin, "rows": plan.rows,
                                          "shards": len(plan.items), "new_samples": 0, "new_images": 0,
                                          **dict.fromkeys(COUNTS, 0), "duplicate_ids": []}
    with stage_run("ingest", cfg.model_dump(mode="json", by_alias=True), ws, parent_run_id,
                   starts_workspace=True) as run:
        loader = LineageBatcher(run.store, run.run_id, summary["sources"])
        items = [item for plan in plans for item in plan.items]
        try:
            map_shards(ingest_shard_task, items, loader.add, description=f"ingest {', '.join(labels)}", stage=run)
        finally:
            loader.flush()  # finished shards reach the lineage even when another shard failed
        for key in (*COUNTS, "new_samples", "new_images"):
            run.summary[key] = sum(c[key] for c in summary["sources"].values())
        run.summary["sources"] = summary["sources"]
    summary.update({k: v for k, v in run.summary.items() if k != "sources"}, run_id=run.run_id, workspace=ws.root)
    logger().info("ingest finished: %s", {k: summary[k] for k in (*COUNTS, "new_samples")})
    print_summary(summary)
    return summary
