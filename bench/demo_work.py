"""Shared by the CPU rewrite benchmarks: a demo workspace's latest rewriter and the work of its first rewrite run
(made once with ``polite run --workspace DIR``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def demo_parser(doc: str | None, rounds: int = 2, max_batch_size: int = 256) -> argparse.ArgumentParser:
    """The options every CPU rewrite benchmark on a demo workspace takes; a script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--max-new-tokens", type=int, default=224, help="the demo's setting")
    parser.add_argument("--max-batch-size", type=int, default=max_batch_size)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def report(result: dict, by: str, out: str | None) -> dict:
    """Add the median ``generate_s`` of ``result["runs"]`` for each value of ``by``, print the result without its
    runs, and write all of it as JSON to ``out`` if given."""
    import json
    import statistics

    for kind in dict.fromkeys(r[by] for r in result["runs"]):
        mine = [r["generate_s"] for r in result["runs"] if r[by] == kind]
        result[f"{kind}_median_generate_s"] = round(statistics.median(mine), 3)  # of 2 rounds: their mean
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


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
    model["path"] = ws.locate(model["path"])  # stored relative to the workspace
    work = [read_table(str(p)) for p in sorted(Path(ws.root, "shards", "rewrites", "work").glob("*.parquet"))]
    first = pa.concat_tables([t for t in work if set(t.column("reason").to_pylist()) == {"first"}])
    first = duckdb.sql(f"SELECT * FROM first ORDER BY {order_by}").to_arrow_table().cast(first.schema)
    return model, first


class DemoShards:
    """The first rewrite run's work of a demo workspace, cut into work-shard files in a fresh folder, and the
    task jobs (``tasks.rewrite.rewrite_shard``) that rewrite them with the workspace's latest rewriter on CPU."""

    def __init__(self, workspace: str, order_by: str, shard_size: int, limit: int | None = None,
                 prefix: str = "bench-"):  # fmt: skip
        import tempfile

        from polite.shards import write_table_atomic

        self.model, self.work = latest_rewriter_and_first_work(workspace, order_by)
        if limit:
            self.work = self.work.slice(0, limit)
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.shards = []
        for start in range(0, self.work.num_rows, shard_size):
            self.shards.append(str(self.folder / f"work-{start}.parquet"))
            write_table_atomic(self.work.slice(start, shard_size), self.shards[-1])

    def job(self, settings: dict, **options) -> dict:
        """A task job for these settings (decoding) and runtime ``options``; add ``work`` and ``out``."""
        from models.prompts import PROMPT_VERSION
        from polite.ids import settings_hash

        return {"model_path": self.model["path"], "model_id": self.model["model_id"],
                "prompt_version": PROMPT_VERSION, "settings": settings, "settings_hash": settings_hash(settings),
                "run_id": None, "device": "cpu", "prefetch_images": True, **options}  # fmt: skip

    def warm_up(self, **options) -> None:
        """Load the model into this process once, outside the timings (a few samples, 4 new tokens)."""
        from models.generation import resolve_generation
        from polite.shards import write_table_atomic
        from tasks.rewrite import rewrite_shard

        job = self.job(resolve_generation("greedy", {"max_new_tokens": 4}), **options)
        job.update(work=str(self.folder / "warm.parquet"), out=str(self.folder / "warm-out.parquet"))
        write_table_atomic(self.work.slice(0, 4), job["work"])
        rewrite_shard(job)
