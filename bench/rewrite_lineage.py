"""The rewrite stage's bookkeeping at PF-1M scale, without a model: what the flow process spends per run.

Fills a fresh lineage with ``--samples`` raw samples (default 1,000,000, twelve sources, four questions per
image on average), then runs the rewrite flow's own functions on it the way a production run does:

1. pick the work (``select_work``, mode ``first``) and cut it into shards (``cut_shards``: work files named by
   content);
2. ingest one result file per shard (``ingest_result``, the flow's ingest: insert, supersede, note the file),
   with ``--failed-rate`` of the rows failed; the result files are written first, as the GPU workers would;
3. resume: pick the work again (nothing left) and look for orphaned result files (``recover_results``);
4. ``--retry-failed``: pick, cut, ingest;
5. ``rerun --where "source = 'gqa'"``: pick through the ``lineage`` view, cut, ingest (every new ok attempt
   supersedes the old one);
6. the README's lineage queries and ``polite explain`` of one sample.

Then it checks the invariant of the stage: every sample has exactly one accepted rewrite (status ok, not
superseded). Prints seconds per step; never asserts on time.

    .venv/bin/python bench/rewrite_lineage.py                        # 1M samples, shards of 2048 (configs/pf1m.yaml)
    .venv/bin/python bench/rewrite_lineage.py --samples 100000 --out /tmp/rewrite_lineage.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# PF-1M's sources, weighted roughly by their share of the paper's raw annotations
SOURCES = {"vqav2": 0.25, "gqa": 0.2, "ocr_vqa": 0.1, "coco_captions": 0.1, "textvqa": 0.05, "textcaps": 0.05,
           "flickr30k": 0.05, "clevr": 0.05, "aokvqa": 0.04, "okvqa": 0.03, "scienceqa": 0.03, "llava": 0.05}  # fmt: skip
OUTPUT = (
    "The image shows a wooden table with two red apples and a white mug. The mug sits to the left of the apples, "
    "and sunlight comes in from a window behind them."
)


def fill(store, n: int, seed: int = 0) -> None:
    """``n`` ok samples with one image each (n/4 distinct images) and their images' rows, in one bulk insert each."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    names = list(SOURCES)
    source = rng.choice(names, size=n, p=np.array(list(SOURCES.values())) / sum(SOURCES.values()))
    n_images = max(1, n // 4)
    image_ids = np.char.add("i_", np.char.zfill(rng.integers(0, n_images, n).astype(str), 12))
    sample_ids = np.char.add("s_", np.char.zfill(np.arange(n).astype(str), 16))
    samples = pa.table(
        {
            "sample_id": sample_ids,
            "source": source,
            "split": np.full(n, "train"),
            "task_type": np.where(
                np.isin(source, ["coco_captions", "textcaps", "flickr30k"]), "caption", "vqa"
            ),
            "images": pa.array([[i] for i in image_ids.tolist()], type=pa.list_(pa.string())),
            "instruction": np.full(n, "<image>What is on the table, and where is the mug?"),
            "raw_response": np.full(n, "two apples; left"),
            "status": np.full(n, "ok"),
        }
    )
    distinct = np.unique(image_ids)
    images = pa.table({"image_id": distinct, "path": np.char.add(np.char.add("images/", distinct), ".jpg")})
    with store.writer() as con:
        store.ingest_arrow("images", images, con=con)
        store.ingest_arrow("samples", samples, con=con)


def results_for(work, key: dict, settings_json: str, run_id: str, failed_rate: float, seed: int):
    """The result table a GPU worker would write for this work shard (``failed_rate`` of it failed)."""
    import numpy as np
    import pyarrow as pa

    from tasks.rewrite import RESULT_SCHEMA

    n = work.num_rows
    failed = np.random.default_rng(seed).random(n) < failed_rate
    return pa.table(
        {
            "rewrite_id": work.column("rewrite_id"),
            "sample_id": work.column("sample_id"),
            "model_id": pa.array([key["model_id"]] * n),
            "prompt_version": pa.array([key["prompt_version"]] * n),
            "settings_hash": pa.array([key["settings_hash"]] * n),
            "settings": pa.array([settings_json] * n),
            "attempt": work.column("attempt"),
            "status": np.where(failed, "failed", "ok"),
            "output": pa.array([None if f else OUTPUT for f in failed.tolist()], type=pa.string()),
            "error": pa.array(["image: cannot identify image file" if f else None for f in failed.tolist()]),
            "input_tokens": np.full(n, 96, dtype=np.int32),
            "output_tokens": np.where(failed, 0, 41).astype(np.int32),
            "latency_ms": np.full(n, 950.0),
            "run_id": pa.array([run_id] * n),
            "reason": work.column("reason"),
        },
        schema=RESULT_SCHEMA,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument(
        "--shard-size", type=int, default=2048, help="samples per GPU task (configs/pf1m.yaml)"
    )
    parser.add_argument("--failed-rate", type=float, default=0.01)
    parser.add_argument("--rerun-where", default="source = 'gqa'")
    parser.add_argument(
        "--root", default=None, help="where the lineage and shards go (default: a temp folder)"
    )
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from flows.rewrite import cut_shards, ingest_result, recover_results, select_work
    from lineage.queries import explain
    from lineage.store import LineageStore
    from models.generation import resolve_generation
    from models.prompts import PROMPT_VERSION
    from polite.config import parse_config
    from polite.ids import settings_hash
    from polite.shards import write_table_atomic
    from polite.workspace import Workspace

    root = Path(args.root or tempfile.mkdtemp(prefix="rewrite-lineage-"))
    store = LineageStore(root / "lineage.duckdb")
    store.migrate()
    ws = Workspace.resolve(root)
    rs = parse_config({}).rewrite
    settings = resolve_generation("paper", {})
    key = {"model_id": "m_bench", "prompt_version": PROMPT_VERSION, "settings_hash": settings_hash(settings)}
    settings_json = json.dumps(
        {**settings, "runtime": {"backend": "fast", "scheduling": "static"}}, sort_keys=True
    )
    base, results_dir = str(root / "rewrites"), str(root / "rewrites" / "results")
    figures: dict = {"samples": args.samples, "shard_size": args.shard_size, "failed_rate": args.failed_rate}

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        figures[name] = round(time.perf_counter() - t0, 3)
        print(f"{name:<34} {figures[name]:>8.3f} s", flush=True)
        return out

    timed("fill (bulk insert, not the flow)", fill, store, args.samples)

    def one_round(mode: str, where: str | None, run_id: str, seed: int) -> int:
        work = timed(f"{mode}: select work", select_work, store, rs, key, mode, where, None)
        jobs = timed(
            f"{mode}: cut shards", cut_shards, work, args.shard_size, base, results_dir, {"run_id": run_id}
        )
        offsets = range(0, work.num_rows, args.shard_size)
        t0 = time.perf_counter()
        for k, (job, start) in enumerate(
            zip(jobs, offsets, strict=True)
        ):  # the GPU workers' part: not the flow's
            shard = work.slice(start, args.shard_size)
            rate = args.failed_rate if mode == "first" else 0.0
            write_table_atomic(results_for(shard, key, settings_json, run_id, rate, seed + k), job["out"])
        figures[f"{mode}: write results (workers)"] = round(time.perf_counter() - t0, 3)
        per_shard = []
        for job in jobs:
            t0 = time.perf_counter()
            ingest_result(store, job["out"], run_id, key, recorded_as=ws.stored(job["out"]))  # as the flow records it
            per_shard.append(time.perf_counter() - t0)
        total = sum(per_shard)
        figures[f"{mode}: ingest results"] = round(total, 3)
        if per_shard:
            figures[f"{mode}: ingest ms per shard (p50, first, last)"] = [
                round(1000 * statistics.median(per_shard), 1), round(1000 * per_shard[0], 1),
                round(1000 * per_shard[-1], 1),
            ]  # fmt: skip
        print(f"{mode + ': ingest results':<34} {total:>8.3f} s  ({len(jobs)} shards, {work.num_rows:,} rows; "
              f"per shard p50 {1000 * statistics.median(per_shard or [0]):.1f} ms)", flush=True)  # fmt: skip
        return work.num_rows

    figures["first: rows"] = one_round("first", None, "run_first", 0)
    figures["resume: rows left"] = timed(
        "resume: select work", select_work, store, rs, key, "first", None, None
    ).num_rows
    figures["resume: orphaned result files"] = timed("resume: recover results", recover_results, store, ws, results_dir,
                                                     "run_resume", key)  # fmt: skip
    figures["retry-failed: rows"] = one_round("retry-failed", None, "run_retry", 1000)
    figures["rerun: rows"] = one_round("rerun", args.rerun_where, "run_rerun", 2000)

    queries = {
        "sql: kept per source (lineage view)": "SELECT source, count(*) AS samples, count(*) FILTER (WHERE kept) "
        "AS kept FROM lineage GROUP BY source",
        "sql: failed rewrites by error": "SELECT error, count(*) FROM rewrites WHERE status = 'failed' GROUP BY error",
        "sql: attempts per sample": "SELECT attempt, reason, count(*) FROM rewrites GROUP BY ALL ORDER BY ALL",
    }
    for name, sql in queries.items():
        timed(name, store.user_query, sql)
    gqa = store.query("SELECT sample_id FROM samples WHERE source = 'gqa' ORDER BY sample_id LIMIT 1")
    report = timed("explain one sample", explain, store, gqa.column(0)[0].as_py())
    figures["explain: rewrite attempts of that sample"] = len(report.get("rewrites", []))

    accepted = store.query(
        "SELECT count(*) AS samples, count(*) FILTER (WHERE n <> 1) AS not_one FROM (SELECT s.sample_id, "
        "count(r.rewrite_id) AS n FROM samples s LEFT JOIN rewrites r ON r.sample_id = s.sample_id "
        "AND r.status = 'ok' AND r.superseded_by IS NULL GROUP BY 1)"
    ).to_pylist()[0]
    figures["check: samples without exactly one accepted rewrite"] = accepted["not_one"]
    figures["database MB"] = round((root / "lineage.duckdb").stat().st_size / 1e6, 1)
    print(f"check: {accepted['not_one']} of {accepted['samples']:,} samples lack exactly one accepted rewrite; "
          f"database {figures['database MB']} MB at {root}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
