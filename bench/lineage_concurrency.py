"""How `polite sql` behaves while a flow is writing the lineage database.

The store's design (lineage/store.py): the single writer holds the DuckDB file only for each short ingest,
and every reader retries with backoff while the file is locked. This script runs a writer *process* that
ingests 2000-row sample shards in a loop (open + ingest + close per shard, like a flow flushing) and,
meanwhile, a reader that issues the queries `polite sql` would. It prints the writer's cost per shard and
the reader's latency percentiles, against a baseline with no writer.

    .venv/bin/python bench/lineage_concurrency.py                   # 40 shards, no pause between them
    .venv/bin/python bench/lineage_concurrency.py --pause 0.2       # a writer that is busy less of the time
    .venv/bin/python bench/lineage_concurrency.py --gap 0           # a reader hammering without pause
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = [
    "SELECT count(*) FROM samples",
    "SELECT source, status, count(*) FROM samples GROUP BY ALL",
    "SELECT sample_id, raw_response FROM samples WHERE raw_response = 'red' LIMIT 5",
]


def make_shards(folder: Path, n_shards: int, rows: int) -> list[str]:
    from polite.record import Sample, samples_to_table
    from polite.shards import write_table_atomic

    urls = []
    for k in range(n_shards):
        samples = [Sample(sample_id=f"s_{k:04d}_{i:05d}", source="bench", split="train", task_type="vqa",
                          instruction="<image>What colour is it?", raw_response=("red", "blue")[i % 2],
                          images=[f"i_{i % 97:032x}"]) for i in range(rows)]
        urls.append(write_table_atomic(samples_to_table(samples), str(folder / f"shard-{k:04d}.parquet")))
    return urls


def writer(db: str, shards: list[str], pause: float) -> None:
    """The writer process: one short writer session per shard; prints per-shard timings as JSON lines."""
    from lineage.store import LineageStore

    store = LineageStore(db)
    for url in shards:
        t0 = time.perf_counter()
        with store.writer() as con:
            t1 = time.perf_counter()
            store.ingest_parquet("samples", url, con=con)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        print(json.dumps({"open": t1 - t0, "ingest": t2 - t1, "close": t3 - t2}), flush=True)
        time.sleep(pause)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def read_loop(store, stop, gap: float = 0.0, max_queries: int = 100_000) -> tuple[list[float], int]:
    from lineage.store import LineageLockedError

    latencies, refused = [], 0
    i = 0
    while not stop() and i < max_queries:
        t0 = time.perf_counter()
        try:
            store.user_query(QUERIES[i % len(QUERIES)], timeout_s=30)
        except LineageLockedError:
            refused += 1
        latencies.append(time.perf_counter() - t0)
        i += 1
        time.sleep(gap)
    return latencies, refused


def ms(v: float) -> str:
    return f"{1000 * v:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds the writer waits between shards")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds the reader waits between queries")
    parser.add_argument("--cli", type=int, default=3, help="`polite sql` invocations timed while writing")
    parser.add_argument("--writer", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer(args.writer[0], json.loads(Path(args.writer[1]).read_text()), args.pause)
        return

    from lineage.store import LineageStore

    tmp = Path(tempfile.mkdtemp(prefix="bench-lineage-"))
    urls = make_shards(tmp / "shards", args.shards + 2, args.rows)
    db = tmp / "lineage.duckdb"
    store = LineageStore(db)
    store.migrate()
    store.ingest_parquet("samples", urls[:2])  # something to read from the start
    (tmp / "urls.json").write_text(json.dumps(urls[2:]))
    import warnings

    warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (contended when > 0.5)")

    t_end = time.monotonic() + 3
    base, _ = read_loop(store, lambda: time.monotonic() > t_end, args.gap)
    print(f"reader alone        : {len(base):5d} queries (gap {args.gap}s)  p50 {ms(pct(base, .5))}  p90 {ms(pct(base, .9))}  "
          f"p99 {ms(pct(base, .99))}")

    proc = subprocess.Popen([sys.executable, __file__, "--writer", str(db), str(tmp / "urls.json"), "--pause",
                             str(args.pause)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    t0 = time.perf_counter()
    cli: list[tuple[float, int]] = []

    def cli_calls() -> None:  # what a user at the terminal sees, process start included
        for _ in range(args.cli):
            c0 = time.perf_counter()
            done = subprocess.run([str(Path(sys.executable).parent / "polite"), "sql", QUERIES[1], "-w", str(tmp),
                                   "--format", "csv"], capture_output=True, text=True, cwd=ROOT)
            cli.append((time.perf_counter() - c0, done.returncode))

    import threading

    thread = threading.Thread(target=cli_calls)
    thread.start()
    lat, refused = read_loop(store, lambda: proc.poll() is not None, args.gap)
    writer_s = time.perf_counter() - t0
    thread.join()
    timings = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    proc.wait()

    per = {k: [t[k] for t in timings] for k in ("open", "ingest", "close")}
    total = [t["open"] + t["ingest"] + t["close"] for t in timings]
    print(f"writer, per shard of {args.rows} rows ({len(timings)} shards, pause {args.pause}s): "
          f"open {ms(statistics.median(per['open']))}  ingest {ms(statistics.median(per['ingest']))}  "
          f"close {ms(statistics.median(per['close']))}  total p50 {ms(pct(total, .5))} p90 {ms(pct(total, .9))}  "
          f"({args.rows * len(timings) / sum(total):,.0f} rows/s over open+ingest+close)")
    print(f"reader while writing: {len(lat):5d} queries  p50 {ms(pct(lat, .5))}  p90 {ms(pct(lat, .9))}  "
          f"p99 {ms(pct(lat, .99))}  max {ms(max(lat))}  refused after 30 s: {refused}  (over {writer_s:.1f} s)")
    for seconds, rc in cli:
        print(f"`polite sql` (new process) while writing: {seconds:.2f} s, exit {rc}")
    count = store.query("SELECT count(*) AS n FROM samples").column("n")[0].as_py()
    assert count == args.rows * (args.shards + 2), count


if __name__ == "__main__":
    main()
