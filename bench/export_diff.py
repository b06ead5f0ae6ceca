"""What `polite diff` costs at PF-1M scale: two export runs of about a million items each.

Builds N samples over 12 sources with one ok rewrite each, a second rewrite for 5% of them, 10 scores per
rewrite and a decision per rewrite; export A publishes the 85% kept at first (two formats, as an export run
writes them), export B the kept after 5% were rewritten (half of them to the same text), 3% dropped, 4% newly kept, 1% re-decided with a
paragraph cut and N/20 samples were ingested. Times `lineage.queries.export_diff` (the macro `export_diff` of views.sql and the report on it),
median of the rounds, and checks its counts against the ones built.

    .venv/bin/python bench/export_diff.py              # 1M samples
    .venv/bin/python bench/export_diff.py --n 100000   # a quick look
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

SCORERS = ("length", "unchanged", "repetition", "truncated", "answer", "semantic", "nli", "clipscore", "reward",
           "reward_raw")  # fmt: skip


def fill(store, n: int) -> dict[str, int]:
    """The lineage described above, in bulk SQL (not measured). Returns the counts the diff must find."""
    new = n // 20
    with store.writer() as con:
        params = {"n": n, "all": n + new}
        con.execute("INSERT INTO samples (sample_id, source, task_type, status, ingested_at) SELECT 's_' || i, "
                    "'src' || (i % 12), 'vqa', 'ok', TIMESTAMP '2026-11-01' + to_days(CAST(i >= $n AS INTEGER) * 10) "
                    "FROM range($all) t(i)", params)  # fmt: skip
        # first rewrites of every sample; second ones (i % 20 = 1) for 5% of the old samples, made later, half of
        # them with the same text (i % 40 = 1: a rerun that wrote it again)
        con.execute("INSERT INTO rewrites (rewrite_id, sample_id, model_id, settings_hash, attempt, status, output, "
                    "created_at) SELECT 'r_' || i, 's_' || i, 'm', 'h', 1, 'ok', 'The answer is ' || i || '.', "
                    "TIMESTAMP '2026-11-01' FROM range($all) t(i)", {"all": n + new})  # fmt: skip
        con.execute("INSERT INTO rewrites (rewrite_id, sample_id, model_id, settings_hash, attempt, status, output, "
                    "created_at) SELECT 'r2_' || i, 's_' || i, 'm', 'h', 2, 'ok', "
                    "CASE WHEN i % 40 = 1 THEN 'The answer is ' ELSE 'It is ' END || i || '.', "
                    "TIMESTAMP '2026-11-05' FROM range($n) t(i) WHERE i % 20 = 1", {"n": n})  # fmt: skip
        con.execute("INSERT INTO scores (rewrite_id, scorer, scorer_version, score, passed) SELECT r.rewrite_id, s.name, "
                    "'1', 0.5, true FROM rewrites r, (SELECT unnest($names) AS name) s",
                    {"names": list(SCORERS)})  # fmt: skip
        # at A: i % 100 < 85 kept. Since: 3% of those dropped (i % 100 < 3), 4% of the rest kept (85 <= i % 100 < 89),
        # second rewrites kept, new samples kept
        con.execute("INSERT INTO decisions (decision_id, rewrite_id, kept, reason, dropped_by, decided_at) "
                    "SELECT 'd_' || i, 'r_' || i, i % 100 < 85, 'x', CASE WHEN i % 100 >= 85 THEN 'semantic' END, "
                    "TIMESTAMP '2026-11-02' FROM range($n) t(i)", {"n": n})  # fmt: skip
        con.execute("INSERT INTO decisions (decision_id, rewrite_id, kept, reason, dropped_by, decided_at) "
                    "SELECT 'd2_' || i, 'r_' || i, i % 100 >= 3, 'x', CASE WHEN i % 100 < 3 THEN 'nli' END, "
                    "TIMESTAMP '2026-11-06' FROM range($n) t(i) WHERE i % 100 < 3 OR i % 100 BETWEEN 85 AND 88",
                    {"n": n})  # fmt: skip
        con.execute("INSERT INTO decisions (decision_id, rewrite_id, kept, reason, decided_at) SELECT 'd3_' || r.rewrite_id, "
                    "r.rewrite_id, true, 'kept', TIMESTAMP '2026-11-06' FROM rewrites r WHERE r.attempt = 2 "
                    "OR r.sample_id IN (SELECT 's_' || i FROM range($n, $all) t(i))", params)  # fmt: skip
        # 1% of what A published (k = 50) re-decided later with a paragraph cut: the same rewrite, another text
        con.execute("INSERT INTO decisions (decision_id, rewrite_id, kept, reason, final_output, decided_at) "
                    "SELECT 'd4_' || i, 'r_' || i, true, 'kept', 'The answer.', TIMESTAMP '2026-11-07' "
                    "FROM range($n) t(i) WHERE i % 100 = 50", {"n": n})  # fmt: skip
        for run, at in (("run_a", "2026-11-03"), ("run_b", "2026-11-20")):
            for fmt in ("pf1m", "llava"):
                con.execute("INSERT INTO exports (export_id, format, path, run_id, created_at) VALUES (?, ?, 'e', ?, ?)",
                            [f"x_{run}_{fmt}", fmt, run, at])  # fmt: skip
        con.execute("INSERT INTO export_items SELECT x, 's_' || i, 'r_' || i FROM range($n) t(i), "
                    "(SELECT unnest(['x_run_a_pf1m', 'x_run_a_llava']) AS x) WHERE i % 100 < 85", {"n": n})  # fmt: skip
        con.execute("INSERT INTO export_items SELECT x, l.sample_id, l.rewrite_id FROM lineage l, "
                    "(SELECT unnest(['x_run_b_pf1m', 'x_run_b_llava']) AS x) WHERE l.kept")  # fmt: skip
    # of every 100 old samples (k = i % 100): removed, dropped since unless rewritten (k % 20 = 1, kept); added,
    # newly kept; rewritten or redone (the same text), every second rewrite (all of them in A: k < 85)
    ks = range(200)
    per_200 = {"removed": sum(k % 100 < 3 and k % 20 != 1 for k in ks), "added": sum(85 <= k % 100 < 89 for k in ks),
               "rewritten": sum(k % 20 == 1 and k % 40 != 1 for k in ks), "redone": sum(k % 40 == 1 for k in ks),
               "recut": 2}  # fmt: skip
    return {**{change: count * (n // 200) for change, count in per_200.items()}, "added": per_200["added"] * (n // 200) + new,
            "new_samples": new}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="samples at export A (a multiple of 200)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from lineage.queries import export_diff
    from lineage.store import LineageStore

    store = LineageStore(Path(tempfile.mkdtemp(prefix="bench-diff-")) / "lineage.duckdb")
    store.migrate()
    t0 = time.perf_counter()
    expected = fill(store, args.n)
    print(f"fill (not measured)  {time.perf_counter() - t0:.1f} s")
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        report = export_diff(store, "run_a", "run_b")
        times.append(time.perf_counter() - t0)
    counts = {**{k: report["counts"][k] for k in ("added", "removed", "rewritten", "redone", "recut")},
              "new_samples": report["new_samples"]}
    assert counts == expected, (counts, expected)
    items = sum(report["counts"][c] for c in ("same", "recut", "removed", "rewritten", "redone"))
    print(f"export A {items:,} items, B {items - report['counts']['removed'] + report['counts']['added']:,}: {counts}")
    print(f"export_diff  median {statistics.median(times):.2f} s  (rounds: {', '.join(f'{t:.2f}' for t in times)})")
    return {"export_diff_s": statistics.median(times)}


if __name__ == "__main__":
    main()
