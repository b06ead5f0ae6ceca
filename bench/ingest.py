"""Ingest throughput and memory: N synthetic text-only samples -> shards + lineage, through the real flow.

Prints samples/s for the whole flow (Prefect tasks, shards, DuckDB ingest), for the shard function alone,
and rows/s for the lineage bulk ingest alone; peak RSS at two sizes shows memory stays flat.

    .venv/bin/python bench/ingest.py                 # 20k and 100k rows
    .venv/bin/python bench/ingest.py --sizes 5000    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_rows(folder: Path, n: int) -> Path:
    """A Hub-layout parquet dataset of n text-only VQA rows (written with pyarrow: fast, deterministic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = folder / "data" / "train-00000-of-00001.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow"]
    table = pa.table({
        "qid": [f"q{i:08d}" for i in range(n)],
        "question": [f"What colour is object number {i}?" for i in range(n)],
        "answer": [colours[i % 4] for i in range(n)],
    })
    pq.write_table(table, target, row_group_size=10_000)
    return folder


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(n: int, shard_size: int, data: Path) -> dict:
    """One size, in its own process so peak RSS belongs to it alone (the data is made by the parent)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest_flow
    from lineage.store import LineageStore
    from polite.config import SourceSpec
    from polite.workspace import Workspace
    from tasks.ingest import ingest_shard, plan_source
    from tasks.sources.loading import clear_cache

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    spec = {"adapter": "generic", "name": "bench", "from": str(data), "split": "train",
            "mapping": {"task_type": "vqa", "key": "qid", "instruction": "question", "response": "answer"}}
    config = {"ingest": {"shard_size": shard_size}}
    out: dict = {"n": n, "shard_size": shard_size}
    with prefect_test_harness(server_startup_timeout=120):
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        summary = ingest_flow(config=config, workspace=str(tmp / "ws"), sources=[spec])
        out["flow_s"] = time.perf_counter() - t0
        out["flow_peak_rss_mb"] = peak_rss_mb()
        out["rss_before_flow_mb"] = rss_before
        assert summary["new_samples"] == n, summary
        # the re-run: every shard reused, nothing new
        t0 = time.perf_counter()
        again = ingest_flow(config=config, workspace=str(tmp / "ws"), sources=[spec])
        out["rerun_s"] = time.perf_counter() - t0
        assert again["new_samples"] == 0

    # the shard function alone (no Prefect, no DuckDB), into a fresh workspace
    ws2 = Workspace.resolve(str(tmp / "ws2")).ensure()
    clear_cache()
    plan = plan_source(SourceSpec.model_validate(spec), ws2.root, shard_size)
    t0 = time.perf_counter()
    results = [ingest_shard(item) for item in plan.items]
    out["shards_only_s"] = time.perf_counter() - t0

    # the lineage bulk ingest alone: all shard files into a fresh database in one statement
    store = LineageStore(tmp / "bulk.duckdb")
    store.migrate()
    t0 = time.perf_counter()
    rows = store.ingest_parquet("samples", [r["samples"] for r in results])
    out["bulk_ingest_s"] = time.perf_counter() - t0
    assert rows == n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shard_size, Path(args.data))))
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (contended when > 0.5)")
    done: list[tuple[int, float]] = []
    for n in args.sizes:
        data = make_rows(Path(tempfile.mkdtemp(prefix="bench-ingest-data-")), n)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--shard-size", str(args.shard_size),
                               "--data", str(data)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"worker for n={n} failed")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"n={n:>7,}  flow {n / r['flow_s']:>8,.0f} samples/s ({r['flow_s']:.1f} s, re-run {r['rerun_s']:.1f} s)  "
            f"shard fn alone {n / r['shards_only_s']:>8,.0f} samples/s  "
            f"lineage bulk ingest {n / r['bulk_ingest_s']:>9,.0f} rows/s  "
            f"peak RSS {r['flow_peak_rss_mb']:.0f} MB (before flow {r['rss_before_flow_mb']:.0f} MB)"
        )
        done.append((n, r["flow_s"]))
    if len(done) >= 2 and done[-1][1] > done[0][1]:
        (n0, t0), (n1, t1) = done[0], done[-1]
        print(f"marginal flow rate {n0:,} -> {n1:,}: {(n1 - n0) / (t1 - t0):,.0f} samples/s "
              "(the fixed cost of flow start, imports and dataset preparation taken out)")


if __name__ == "__main__":
    main()
