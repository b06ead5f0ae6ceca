"""The filter stage over one work shard: read rewrites, run the chain, write scores and decisions parquet.

Pure apart from its output files, which sit at paths derived from the work shard's name (itself a hash of
its rewrite ids and the settings), so a repeated task finds them and does nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from filters.base import ScoreInput
from filters.chain import Chain
from polite.shards import exists, read_table, write_table_atomic

SCORE_SCHEMA = pa.schema(
    [
        ("rewrite_id", pa.string()),
        ("scorer", pa.string()),
        ("scorer_version", pa.string()),
        ("score", pa.float64()),
        ("passed", pa.bool_()),
        ("threshold", pa.float64()),
        ("details", pa.string()),
        ("run_id", pa.string()),
    ]
)
DECISION_SCHEMA = pa.schema(
    [
        ("decision_id", pa.string()),
        ("rewrite_id", pa.string()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("final_output", pa.string()),
        ("run_id", pa.string()),
        ("settings_hash", pa.string()),
        ("dropped_by", pa.string()),
        ("removed_paragraphs", pa.list_(pa.int32())),
        ("decided_at", pa.timestamp("us")),
    ]
)


def items_from_table(
    table: pa.Table,
) -> tuple[list[ScoreInput], dict[str, dict[str, tuple[float | None, dict]]]]:
    """Work-shard rows -> scorer inputs, and the scores already stored for them (by scorer name)."""
    items: list[ScoreInput] = []
    prior: dict[str, dict[str, tuple[float | None, dict]]] = {}
    for row in table.to_pylist():
        items.append(
            ScoreInput(
                rewrite_id=row["rewrite_id"],
                rewrite=row["rewrite"] or "",
                raw_response=row.get("raw_response") or "",
                instruction=row.get("instruction") or "",
                task_type=row.get("task_type") or "",
                source=row.get("source") or "",
                sample_id=row.get("sample_id") or "",
                image_paths=list(row.get("image_paths") or []),
            )
        )
        for p in row.get("prior") or []:
            details = json.loads(p["details"]) if p.get("details") else {}
            prior.setdefault(row["rewrite_id"], {})[p["scorer"]] = (p["score"], details)
    return items, prior


def output_urls(work_url: str, out_dir: str) -> tuple[str, str]:
    stem = work_url.rsplit("/", 1)[-1].removesuffix(".parquet")
    return f"{out_dir}/{stem}.scores.parquet", f"{out_dir}/{stem}.decisions.parquet"


def score_shard(
    work_url: str, spec: dict[str, Any], out_dir: str, run_id: str | None = None, full_scoring: bool = False
) -> dict[str, Any]:
    """Score one work shard through the chain described by ``spec`` (``Chain.spec()``)."""
    scores_url, decisions_url = output_urls(work_url, out_dir)
    if exists(scores_url) and exists(decisions_url):
        return {"scores": scores_url, "decisions": decisions_url, "reused": True, "counts": {}}
    items, prior = items_from_table(read_table(work_url))
    chain = Chain.from_spec(spec)
    score_rows, decision_rows = chain.run(items, prior=prior, full_scoring=full_scoring, run_id=run_id)
    write_table_atomic(pa.Table.from_pylist(score_rows, schema=SCORE_SCHEMA), scores_url)
    write_table_atomic(pa.Table.from_pylist(decision_rows, schema=DECISION_SCHEMA), decisions_url)
    return {"scores": scores_url, "decisions": decisions_url, "reused": False, "counts": chain.counts()}
