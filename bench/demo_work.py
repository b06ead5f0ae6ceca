"""Shared by the CPU rewrite benchmarks: a demo workspace's latest rewriter and the work of its first rewrite run
(made once with ``polite run --workspace DIR``)."""

from __future__ import annotations

from pathlib import Path


def latest_rewriter_and_first_work(workspace: str, order_by: str):
    """(``{"model_id", "path"}`` of the latest rewriter, the first rewrite run's work rows ordered by ``order_by``)."""
    import duckdb
    import pyarrow as pa

    from lineage.store import LineageStore
    from polite.shards import read_table
    from polite.workspace import Workspace

    ws = Workspace.resolve(workspace)
    model = (
        LineageStore(ws.db_path)
        .query("SELECT model_id, path FROM models WHERE kind = 'rewriter' ORDER BY created_at DESC LIMIT 1")
        .to_pylist()[0]
    )
    work = [read_table(str(p)) for p in sorted(Path(ws.root, "shards", "rewrites", "work").glob("*.parquet"))]
    first = pa.concat_tables([t for t in work if set(t.column("reason").to_pylist()) == {"first"}])
    first = duckdb.sql(f"SELECT * FROM first ORDER BY {order_by}").to_arrow_table().cast(first.schema)
    return model, first
