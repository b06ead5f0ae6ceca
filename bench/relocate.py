"""What a relocatable workspace costs at PF-1M scale: migration 010 on a database written with absolute paths,
and `Workspace.locate_paths` over a rewrite selection's image paths.

Builds N images, N samples (one image each, their ingest shard named), N/1000 result files, a trained rewriter
and an export, all with the absolute paths older versions stored; times the migration that makes them relative,
checks that no absolute path of the old root is left, then times resolving N one-image path lists.

    .venv/bin/python bench/relocate.py               # 1M images and samples
    .venv/bin/python bench/relocate.py --n 100000    # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fill_old_style(store, old_root: str, n: int) -> None:
    """Rows as versions before migration 010 wrote them (bulk, in SQL: the fill is not what is measured)."""
    with store.writer() as con:
        con.execute(
            "INSERT INTO images (image_id, path) SELECT 'i_' || md5(i::VARCHAR), "
            "$root || '/images/' || substr(md5(i::VARCHAR), 1, 2) || '/i_' || md5(i::VARCHAR) || '.jpg' "
            "FROM range($n) t(i)",
            {"root": old_root, "n": n},
        )
        con.execute(
            "INSERT INTO samples (sample_id, source, status, images, shard) SELECT 's_' || i, 'gqa', 'ok', "
            "['i_' || md5(i::VARCHAR)], $root || '/shards/samples/gqa/' || (i // 2000) || '.parquet' FROM range($n) t(i)",
            {"root": old_root, "n": n},
        )
        con.execute(
            "INSERT INTO rewrite_result_files (path, model_id, n_rows) SELECT "
            "$root || '/shards/rewrites/results/m_a/pf-v1-h/' || i || '.parquet', 'm_a', 1000 FROM range($k) t(i)",
            {"root": old_root, "k": max(1, n // 1000)},
        )
        con.execute(
            "INSERT INTO models (model_id, kind, path, training_set, created_by_run) VALUES "
            "('m_a', 'rewriter', $p, $p || '/training_set.parquet', 'run_t')",
            {"p": f"{old_root}/models/rewriter-0123456789ab"},
        )
        con.execute("INSERT INTO exports (export_id, format, path) VALUES ('x_1', 'pf1m', ?)",
                    [f"{old_root}/exports/pf1m-x_00112233aabbccdd"])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="images and samples")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of locate_paths (median printed)")
    args = parser.parse_args(argv)

    import pyarrow as pa

    import lineage.store as store_module
    from lineage.store import LineageStore
    from polite.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="bench-relocate-"))
    store = LineageStore(tmp / "lineage.duckdb")
    real = store_module._migrations
    store_module._migrations = lambda: [m for m in real() if m[0] < 10]
    try:
        store.migrate()
    finally:
        store_module._migrations = real
    old_root = "/data/an old place/workspace"
    t0 = time.perf_counter()
    fill_old_style(store, old_root, args.n)
    print(f"fill (old-style rows, not measured)  {time.perf_counter() - t0:.2f} s")

    store_module._migrations = lambda: [m for m in real() if m[0] <= 10]  # 010 alone is what is timed
    try:
        t0 = time.perf_counter()
        applied = store.migrate()
        migrate_s = time.perf_counter() - t0
    finally:
        store_module._migrations = real
    assert applied == ["010_relative_paths.sql"], applied
    left = store.query(
        "SELECT (SELECT count(*) FROM images WHERE starts_with(path, $r)) + "
        "(SELECT count(*) FROM samples WHERE starts_with(shard, $r)) + "
        "(SELECT count(*) FROM rewrite_result_files WHERE starts_with(path, $r)) + "
        "(SELECT count(*) FROM models WHERE starts_with(path, $r)) + "
        "(SELECT count(*) FROM exports WHERE starts_with(path, $r)) AS n",
        {"r": old_root},
    ).column("n")[0].as_py()
    assert left == 0, f"{left} paths under the old root after migration 010"
    print(f"migration 010, {args.n:,} images + {args.n:,} samples  {migrate_s:.2f} s  (no old path left)")

    ws = Workspace.resolve(tmp / "moved")
    paths = store.query("SELECT [path] AS image_paths FROM images")
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        located = ws.locate_paths(paths, "image_paths")
        times.append(time.perf_counter() - t0)
    first = located.column("image_paths")[0].as_py()[0]
    assert first.startswith(ws.root + "/images/"), first
    assert isinstance(located.column("image_paths").type, pa.ListType)
    print(f"locate_paths, {args.n:,} one-image lists  {statistics.median(times):.3f} s median of {args.rounds} "
          f"({min(times):.3f}-{max(times):.3f})")
    return {"migrate_s": migrate_s, "locate_s": statistics.median(times), "old_paths_left": left, "first": first,
            "root": ws.root}  # fmt: skip


if __name__ == "__main__":
    main()
