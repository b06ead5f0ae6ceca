"""The ingest stage: one shard = a contiguous row range of one source -> a samples shard + an images shard.

``plan_source`` opens the dataset (memory-mapped), checks the adapter's columns and cuts the row ranges;
``ingest_shard`` is the pure per-shard function; ``ingest_shard_task`` is its Prefect wrapper. Output paths
depend only on the source, its settings and the row range, so a repeated shard is a no-op.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from prefect import task

from polite.config.ingest import SourceSpec
from polite.ids import stable_hash
from polite.images import IMAGE_SCHEMA, ImageStore
from polite.record import samples_to_table
from polite.shards import exists, write_table_atomic
from polite.workspace import Workspace
from tasks.sources import get_adapter
from tasks.sources.base import RowContext, build_samples
from tasks.sources.loading import arrow_rows, looks_local

COUNTS_KEY = b"polite.ingest.counts"
# Part of every shard's fingerprint: bumped when the samples shard gains a column the flow relies on
# (2: source_row), so shards written before are rebuilt rather than reused.
SHARD_FORMAT = 2


@dataclass
class SourcePlan:
    """What the flow needs to fan one source out: its label, size and one item per shard."""

    label: str
    adapter: str
    origin: str
    rows: int
    fingerprint: str
    items: list[dict[str, Any]] = field(default_factory=list)


def _spec_dict(spec: SourceSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True)


def plan_source(spec: SourceSpec, workspace_root: str, shard_size: int, retry_failed: bool = False) -> SourcePlan:
    """Open the source and check its columns (raises ``SourceError`` naming the missing ones), then cut shards.

    With ``retry_failed`` a finished shard that holds failed samples is read again rather than reused.
    """
    if spec.from_ and looks_local(spec.from_):  # shard items must mean the same on any worker
        spec = spec.model_copy(update={"from_": str(Path(os.path.expanduser(spec.from_)).resolve())})
    adapter = get_adapter(spec, workspace_root)
    dataset = adapter.load()
    adapter.check_columns(list(dataset.column_names))
    adapter.prepare(dataset)  # fails early too when a joined source (GQA images, COCO boxes) is unusable
    rows = dataset.num_rows if spec.limit is None else min(spec.limit, dataset.num_rows)
    settings = {k: v for k, v in _spec_dict(spec).items() if k != "limit"}
    fingerprint = stable_hash(
        "ingest", SHARD_FORMAT, adapter.name, adapter.version, settings, adapter.source, getattr(dataset, "_fingerprint", ""), length=12
    )
    ws = Workspace.resolve(workspace_root)
    plan = SourcePlan(spec.label, adapter.name, adapter.source, rows, fingerprint)
    for start in range(0, rows, shard_size):
        stop = min(start + shard_size, rows)
        name = f"{fingerprint}-{start:010d}-{stop:010d}.parquet"
        plan.items.append(
            {
                "spec": _spec_dict(spec),
                "workspace": ws.root,
                "label": spec.label,
                "start": start,
                "stop": stop,
                "samples_url": ws.url("shards", "samples", spec.label, name),
                "images_url": ws.url("shards", "images", spec.label, name),
                "retry_failed": retry_failed,
            }
        )
    return plan


def _read_counts(samples_url: str) -> dict[str, int]:
    fs, path = url_to_fs(samples_url)
    with fs.open(path, "rb") as handle:
        meta = pq.read_schema(handle).metadata or {}
    return json.loads(meta.get(COUNTS_KEY, b"{}"))


def ingest_shard(item: dict[str, Any]) -> dict[str, Any]:
    """Map rows ``[start, stop)`` of one source to samples; store images; write both shards atomically.

    Bad rows become failed samples; the shard itself only raises on a failure of the source as a whole.
    """
    result = {"source": item["label"], "samples": item["samples_url"], "images": item["images_url"],
              "rows": item["stop"] - item["start"]}
    if exists(item["samples_url"]) and exists(item["images_url"]):
        counts = _read_counts(item["samples_url"])
        # The fingerprint covers the data files, not the image files they name: after fixing an image on disk,
        # --retry-failed reads the shards that hold failed samples again (the flow then replaces the failed
        # samples that come back ok; ok samples are never touched).
        if not (item.get("retry_failed") and counts.get("failed")):
            return result | counts | {"reused": True}

    spec = SourceSpec.model_validate(item["spec"])
    ws = Workspace.resolve(item["workspace"])
    adapter = get_adapter(spec, ws.root)
    dataset = adapter.load()
    adapter.prepare(dataset)
    ctx = RowContext(
        label=spec.label, split=adapter.split or "train", revision=spec.revision or "",
        store=ImageStore(ws.images), image_roots=adapter.image_roots(),
    )
    samples, source_rows, skipped = [], [], 0
    for index, row in arrow_rows(dataset, item["start"], item["stop"]):
        made, skip = build_samples(adapter, row, index, ctx)
        samples.extend(made)
        source_rows.extend([index] * len(made))
        skipped += skip
    failed = sum(1 for s in samples if s.status == "failed")
    counts = {"ok": len(samples) - failed, "failed": failed, "skipped": skipped}
    # stored relative to the workspace, so the workspace can move (polite/workspace.py)
    images = pa.Table.from_pylist(
        [row | {"path": ws.stored(row["path"])} for row in ctx.images.values()], schema=IMAGE_SCHEMA
    )
    write_table_atomic(images, item["images_url"])
    table = samples_to_table(samples)
    # the shard's own (deterministic) URL travels with its rows, so the flow can bulk-load files directly
    table = table.append_column("shard", pa.array([ws.stored(item["samples_url"])] * table.num_rows, pa.string()))
    # each sample's row in the source: where a key repeats, the lineage keeps the first row (lineage/store.py)
    table = table.append_column("source_row", pa.array(source_rows, type=pa.int64()))
    table = table.replace_schema_metadata({COUNTS_KEY: json.dumps(counts).encode()})
    write_table_atomic(table, item["samples_url"])  # written last: its presence marks the shard done
    return result | counts | {"reused": False}


@task(name="ingest-shard", task_run_name="ingest {item[label]} rows {item[start]}-{item[stop]}", retries=1)
def ingest_shard_task(item: dict[str, Any]) -> dict[str, Any]:
    """Prefect wrapper: one task per shard (never per sample)."""
    return ingest_shard(item)
