"""The DuckDB lineage store: schema, idempotent bulk ingest, read-only guard, and two real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from lineage.store import LineageStore, PredicateError, ReadOnlyQueryError, check_read_only_sql
from polite.record import Sample, samples_to_table
from polite.shards import write_table_atomic

CONTRACT = {
    "runs": ["run_id", "flow", "status", "started_at", "finished_at", "config"],
    "samples": ["sample_id", "source", "split", "task_type", "instruction", "raw_response", "status", "error"],
    "pairs": ["pair_id", "sample_id", "method", "params", "seed", "distorted", "status"],
    "models": ["model_id", "kind", "base", "created_by_run"],
    "rewrites": ["rewrite_id", "sample_id", "model_id", "settings_hash", "attempt", "status", "output", "error", "run_id"],
    "scores": ["rewrite_id", "scorer", "scorer_version", "score", "passed"],
    "decisions": ["rewrite_id", "kept", "reason"],
    "exports": ["export_id", "format", "path", "run_id"],
    "export_items": ["export_id", "sample_id", "rewrite_id"],
}


def make_samples(n: int, source: str = "unit") -> list[Sample]:
    return [
        Sample(sample_id=f"s_{source}_{i}", source=source, split="train", task_type="vqa",
               instruction="<image>Q?", raw_response=f"answer {i}")
        for i in range(n)
    ]


def test_migrate_creates_the_lineage_contract_and_is_repeatable(workspace):
    store = LineageStore(workspace.db_path)
    assert "001_initial.sql" in store.migrate()
    assert store.migrate() == []
    with store.reader() as con:
        for table, columns in CONTRACT.items():
            have = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
            assert set(columns) <= have, (table, set(columns) - have)
        view_cols = {r[0] for r in con.execute("DESCRIBE lineage").fetchall()}
    assert {"sample_id", "source", "rewrite", "reward", "kept", "export_id"} <= view_cols


def test_ingest_parquet_is_idempotent_on_keys(workspace):
    store = LineageStore(workspace.db_path)
    store.migrate()
    url = write_table_atomic(samples_to_table(make_samples(100)), workspace.url("shards", "t", "a.parquet"))
    assert store.ingest_parquet("samples", url) == 100
    assert store.ingest_parquet("samples", url) == 0
    # a second shard overlapping the first adds only the new keys
    url2 = write_table_atomic(samples_to_table(make_samples(150)), workspace.url("shards", "t", "b.parquet"))
    assert store.ingest_parquet("samples", url2) == 50
    assert store.query("SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 150


def test_shards_ingest_from_a_workspace_whose_path_has_an_apostrophe(tmp_path):
    """DuckDB reads the shard files by name: a quote in the folder (/home/o'brien/ws) is part of the path."""
    from polite.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "o'brien's ws").ensure()
    store = LineageStore(ws.db_path)
    store.migrate()
    url = write_table_atomic(samples_to_table(make_samples(20)), ws.url("shards", "t", "a.parquet"))
    assert store.ingest_parquet("samples", url) == 20
    url2 = write_table_atomic(
        samples_to_table(make_samples(30)).append_column("source_row", pa.array(range(30), pa.int64())),
        ws.url("shards", "t", "b.parquet"),
    )
    with store.writer() as con:
        assert store.ingest_samples([url2], "run_x", con=con) == []
    assert store.query("SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 30


def decision_rows(ids, reason: str) -> pa.Table:
    return pa.table(
        {
            "decision_id": [f"d_{i}" for i in ids],
            "rewrite_id": [f"r_{i}" for i in ids],
            "kept": [True] * len(ids),
            "reason": [reason] * len(ids),
        }
    )


def test_decisions_keep_their_key_unique_without_an_index(workspace):
    store = LineageStore(workspace.db_path)
    store.migrate()
    assert store.ingest_arrow("decisions", decision_rows(range(5), "first")) == 5
    # ignore (the default): existing keys are skipped, new ones added, duplicates in one shard collapse
    assert store.ingest_arrow("decisions", decision_rows([3, 4, 5, 5], "second")) == 1
    # replace: existing keys take the new row, and the count is still of new keys
    assert store.ingest_arrow("decisions", decision_rows([0, 6], "third"), replace=True) == 1
    rows = store.query("SELECT decision_id, reason FROM decisions ORDER BY decision_id").to_pylist()
    assert [(r["decision_id"], r["reason"]) for r in rows] == [
        ("d_0", "third"), ("d_1", "first"), ("d_2", "first"), ("d_3", "first"),
        ("d_4", "first"), ("d_5", "second"), ("d_6", "third"),
    ]  # fmt: skip


def test_migrations_007_008_keep_existing_decisions_and_their_thresholds(workspace, monkeypatch):
    import lineage.store as store_module

    real = store_module._migrations
    monkeypatch.setattr(store_module, "_migrations", lambda: [m for m in real() if m[0] < 7])
    monkeypatch.setattr(store_module, "_views_sql", lambda: "SELECT 1")  # the views of 007 need its schema
    store = LineageStore(workspace.db_path)
    store.migrate()
    with store.writer() as con:
        con.execute(
            "INSERT INTO decisions (decision_id, rewrite_id, kept, reason, final_output, settings_hash, "
            "removed_paragraphs, thresholds) VALUES ('d_a', 'r_a', false, 'dropped: x', 'text', 'h', [1, 2], '{}')"
        )
    monkeypatch.undo()
    assert store.migrate()[:2] == ["007_decisions_unindexed.sql", "008_decision_settings.sql"]
    row = store.query("SELECT * EXCLUDE (decided_at) FROM decisions").to_pylist()
    assert row == [
        {"decision_id": "d_a", "rewrite_id": "r_a", "kept": False, "reason": "dropped: x", "final_output": "text",
         "thresholds": "{}", "run_id": None, "settings_hash": "h", "dropped_by": None, "removed_paragraphs": [1, 2]}
    ]  # fmt: skip
    with store.reader() as con:
        assert con.execute("SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'decisions' "
                           "AND constraint_type = 'PRIMARY KEY'").fetchall() == [(0,)]  # fmt: skip
        assert con.execute("SELECT count(*) FROM lineage").fetchall() == [(0,)]  # the views are back
        assert con.execute("SELECT settings_hash, thresholds FROM decision_settings").fetchall() == [("h", "{}")]
        assert con.execute("SELECT thresholds FROM latest_decisions").fetchall() == [("{}",)]


def test_migration_010_stores_the_factory_s_own_paths_relative_to_the_workspace(workspace, monkeypatch):
    """Absolute paths (and URLs) in the layout only the factory writes become relative to the workspace root;
    a model folder passed with --model, and anything else, stays as it was."""
    import lineage.store as store_module

    real = store_module._migrations
    monkeypatch.setattr(store_module, "_migrations", lambda: [m for m in real() if m[0] < 10])
    store = LineageStore(workspace.db_path)
    store.migrate()
    old = "/data/old place/ws"  # where the workspace was when these rows were written
    image = "i_" + "ab" * 16
    with store.writer() as con:
        con.executemany("INSERT INTO images (image_id, path) VALUES (?, ?)", [
            (image, f"{old}/images/ab/{image}.png"), ("i_s3", f"s3://bucket/ws/images/cd/i_{'cd' * 16}.jpg"),
            ("i_user", "/elsewhere/pictures/cat.jpg"), ("i_rel", f"images/ef/i_{'ef' * 16}.png")])
        con.executemany("INSERT INTO models (model_id, kind, path, training_set, created_by_run) "
                        "VALUES (?, 'rewriter', ?, ?, ?)", [
            ("m_trained", f"{old}/models/rewriter-0123456789ab",
             f"{old}/models/rewriter-0123456789ab/training_set.parquet", "run_t"),
            ("m_given", "/home/me/models/rewriter-0123456789ab", None, None)])
        con.execute("INSERT INTO exports (export_id, format, path) VALUES ('x_1', 'pf1m', ?)",
                    [f"{old}/exports/pf1m-x_00112233aabbccdd"])
        result = f"{old}/shards/rewrites/results/m_a/pf-v1-h/0123.parquet"
        con.execute("INSERT INTO rewrite_result_files (path, model_id, n_rows) VALUES (?, 'm_a', 3)", [result])
        con.execute("INSERT INTO samples (sample_id, source, status, shard) VALUES ('s_1', 'x', 'ok', ?)",
                    [f"{old}/shards/samples/x/s-0-10.parquet"])
    monkeypatch.undo()
    assert store.migrate()[:1] == ["010_relative_paths.sql"]
    rows = lambda sql: store.query(sql).to_pylist()  # noqa: E731
    assert rows("SELECT image_id, path FROM images ORDER BY image_id") == [
        {"image_id": image, "path": f"images/ab/{image}.png"},
        {"image_id": "i_rel", "path": f"images/ef/i_{'ef' * 16}.png"},
        {"image_id": "i_s3", "path": f"images/cd/i_{'cd' * 16}.jpg"},
        {"image_id": "i_user", "path": "/elsewhere/pictures/cat.jpg"},
    ]
    assert rows("SELECT model_id, path, training_set FROM models ORDER BY model_id") == [
        {"model_id": "m_given", "path": "/home/me/models/rewriter-0123456789ab", "training_set": None},
        {"model_id": "m_trained", "path": "models/rewriter-0123456789ab",
         "training_set": "models/rewriter-0123456789ab/training_set.parquet"},
    ]  # fmt: skip
    assert rows("SELECT path FROM exports") == [{"path": "exports/pf1m-x_00112233aabbccdd"}]
    assert rows("SELECT path, model_id, n_rows FROM rewrite_result_files") == [
        {"path": "shards/rewrites/results/m_a/pf-v1-h/0123.parquet", "model_id": "m_a", "n_rows": 3}]
    assert rows("SELECT shard FROM samples") == [{"shard": "shards/samples/x/s-0-10.parquet"}]
    assert workspace.locate(rows("SELECT path FROM images WHERE image_id = 'i_rel'")[0]["path"]) == (
        f"{workspace.root}/images/ef/i_{'ef' * 16}.png")


def test_a_run_s_summary_records_paths_inside_the_workspace_relative(started_workspace):
    """`polite explain`/`polite sql` on `runs` of a moved or copied workspace: the summary says where the model,
    report and sources are inside it, not where the workspace was; paths elsewhere stay as they are."""
    import json

    from flows.common import stage_run

    workspace = started_workspace

    with stage_run("train_rewriter", {}, workspace) as run:
        run.summary.update(path=str(Path(workspace.models) / "rewriter-0123456789ab"), model="/elsewhere/m", n=3,
                           sources={"demo": {"from": f"{workspace.root}/sources/demo"}},
                           reports=[Path(workspace.reports) / "r" / "report.md"], name=workspace.root + "-other/x")
    (summary,) = LineageStore(workspace.db_path).query("SELECT summary FROM runs").column("summary").to_pylist()
    assert json.loads(summary) == {"path": "models/rewriter-0123456789ab", "model": "/elsewhere/m", "n": 3,
                                   "sources": {"demo": {"from": "sources/demo"}}, "reports": ["reports/r/report.md"],
                                   "name": workspace.root + "-other/x"}  # fmt: skip


def test_relocate_benchmark_leaves_no_old_path_and_locates_under_the_new_root(bench_script):
    figures = bench_script("relocate").main(["--n", "3000", "--rounds", "1"])
    assert figures["old_paths_left"] == 0
    assert figures["first"].startswith(figures["root"] + "/images/") and figures["first"].endswith(".jpg")


def test_ingest_rejects_a_shard_without_the_key(workspace):
    store = LineageStore(workspace.db_path)
    store.migrate()
    with pytest.raises(ValueError, match="lacks key column"):
        store.ingest_arrow("samples", pa.table({"source": ["x"]}))


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM samples",
        "INSERT INTO runs VALUES ('x')",
        "CREATE TABLE t (a INT)",
        "ATTACH 'other.duckdb' AS o",
        "COPY samples TO 'out.csv'",
        "INSTALL httpfs",
        "SELECT 1; DELETE FROM samples",
        "SET threads = 1",
        # EXPLAIN is allowed, but only of a SELECT: EXPLAIN ANALYZE runs the statement it explains
        "EXPLAIN DELETE FROM samples",
        "EXPLAIN ANALYZE INSERT INTO runs VALUES ('x')",
        "/* why */ EXPLAIN (FORMAT json) DELETE FROM samples",
    ],
)
def test_user_sql_refuses_anything_but_one_select(sql):
    with pytest.raises(ReadOnlyQueryError):
        check_read_only_sql(sql)


def test_user_sql_explains_a_select_and_says_why_it_refuses_a_write(workspace):
    store = LineageStore(workspace.db_path)
    store.migrate()
    for sql in ("EXPLAIN SELECT 1", "EXPLAIN ANALYZE SELECT count(*) FROM samples", "-- plan\nEXPLAIN (SELECT 1)",
                "EXPLAIN (FORMAT json) FROM lineage", "SHOW TABLES", "DESCRIBE lineage"):  # fmt: skip
        assert store.user_query(sql).num_rows > 0, sql
    with pytest.raises(ReadOnlyQueryError, match="EXPLAIN of a DELETE statement is refused"):
        store.user_query("EXPLAIN ANALYZE DELETE FROM samples")
    # each refusal names what the user wrote, not the parser's statement type
    with pytest.raises(ReadOnlyQueryError, match="^CHECKPOINT statements are refused"):
        store.user_query("CHECKPOINT")
    with pytest.raises(ReadOnlyQueryError, match=r"the query writes \(an INSERT, UPDATE or DELETE inside it\)"):
        store.user_query("WITH gone AS (DELETE FROM samples RETURNING *) SELECT count(*) FROM gone")
    with pytest.raises(ReadOnlyQueryError, match="a PIVOT without an IN list"):
        store.user_query("PIVOT rewrites ON status USING count(*)")
    # ... and the way it names works
    assert store.user_query("PIVOT rewrites ON status IN ('ok', 'failed') USING count(*) GROUP BY model_id").num_rows == 0


def test_user_sql_cannot_read_files(workspace, tmp_path):
    store = LineageStore(workspace.db_path)
    store.migrate()
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(ReadOnlyQueryError, match="refused"):
        store.user_query(f"SELECT * FROM read_csv('{secret}')")
    assert store.user_query("SELECT count(*) AS n FROM lineage").column("n")[0].as_py() == 0


def test_reader_waits_for_a_writer_in_another_process(workspace):
    """A second process holds the file read-write for a while; our read-only query waits and succeeds."""
    store = LineageStore(workspace.db_path)
    store.migrate()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, time, sys
            con = duckdb.connect({str(workspace.db_path)!r})
            con.execute("INSERT INTO runs (run_id, flow, status, started_at) VALUES ('r1', 'x', 'running', now())")
            print('locked', flush=True)
            time.sleep(1.5)
            con.close()
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    started = time.monotonic()
    rows = store.query("SELECT run_id FROM runs", timeout_s=30).to_pylist()
    waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert rows == [{"run_id": "r1"}]
    assert waited > 0.5  # it really had to wait for the other process's lock


def test_reader_gives_up_with_a_clear_error(workspace):
    from lineage.store import LineageLockedError

    store = LineageStore(workspace.db_path)
    store.migrate()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({str(workspace.db_path)!r}); print('x', flush=True); time.sleep(5)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        holder.stdout.readline()
        with pytest.raises(LineageLockedError, match="locked by another process for 0.3s"):
            store.query("SELECT 1", timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()


def test_check_predicate_names_the_option_and_what_was_meant(workspace, tmp_path):
    store = LineageStore(workspace.db_path)
    store.migrate()
    store.ingest_arrow("samples", samples_to_table(make_samples(3)))
    store.check_predicate("source = 'unit' AND task_type = 'vqa'", "lineage", "--where")  # binds: no error
    with pytest.raises(PredicateError, match=r"--where 'sourc = 1' is not a predicate over lineage.*\"source\""):
        store.check_predicate("sourc = 1", "lineage", "--where")
    (tmp_path / "secret.csv").write_text("a\n1\n")
    for bad in (
        "true; DROP TABLE samples",  # a second statement
        "true ORDER BY 1",  # a clause past the predicate
        f"(SELECT count(*) FROM read_csv('{tmp_path / 'secret.csv'}')) > 0",  # file access
        "source =",  # does not parse
        "true) OR (true",  # balanced inside our parentheses, but out of a command's `ok AND (...)`
    ):
        with pytest.raises(PredicateError, match="train.pairs_where"):
            store.check_predicate(bad, "samples s", "train.pairs_where")
    assert len(store.query("SELECT * FROM samples")) == 3
    # parentheses inside strings and nested ones are fine
    store.check_predicate("(source = ')' OR (task_type IN ('vqa')))", "lineage", "--where")


def test_the_workspace_option_also_goes_before_the_command(workspace, tmp_path, monkeypatch):
    """`polite -w DIR sql ...` reads DIR, as `polite sql ... -w DIR` does."""
    from typer.testing import CliRunner

    from polite.cli import app

    LineageStore(workspace.db_path).migrate()
    monkeypatch.setenv("POLITE_WORKSPACE", str(tmp_path / "elsewhere"))  # restored after the test
    before = CliRunner().invoke(app, ["-w", str(workspace.root), "sql", "SELECT count(*) AS n FROM samples"])
    after = CliRunner().invoke(app, ["sql", "SELECT count(*) AS n FROM samples", "-w", str(workspace.root)])
    assert before.exit_code == after.exit_code == 0, before.output
    assert before.output == after.output and "0" in before.output
    missing = CliRunner().invoke(app, ["-w", str(tmp_path / "nowhere"), "sql", "SELECT 1"])
    assert missing.exit_code != 0 and "nowhere" in missing.output


def test_a_wrong_query_is_one_line_that_names_the_columns(workspace):
    from typer.testing import CliRunner

    from polite.cli import app

    LineageStore(workspace.db_path).migrate()
    wrong = CliRunner().invoke(app, ["sql", "SELECT kind FROM runs", "-w", str(workspace.root)])
    assert wrong.exit_code == 2 and "Traceback" not in wrong.output
    assert 'column "kind" not found' in wrong.output and "Candidate bindings" in wrong.output
    missing = CliRunner().invoke(app, ["sql", "SELECT * FROM no_such_table", "-w", str(workspace.root)])
    assert missing.exit_code == 2 and "no_such_table" in missing.output and "SHOW TABLES" in missing.output


# -- the views over a sample's whole history ----------------------------------------------------------------
def _thresholds(settings_hash: str, reward_version: str) -> str:
    """``decision_settings.thresholds`` as ``Chain.thresholds_json`` writes it."""
    import json

    scorers = {"reward": {"version": reward_version, "min_score": 0.0}, "length": {"version": "v1-len", "min_words": 1}}
    return json.dumps({"settings_hash": settings_hash, "scorers": scorers}, sort_keys=True)


def _history(store: LineageStore) -> None:
    """s_a: rerun (attempt 1 superseded by 2) then a failed attempt 3, re-scored by a new reward version, re-decided,
    exported before the rerun; s_b: exported twice; s_c: never rewritten."""
    with store.writer() as con:
        con.execute("INSERT INTO samples (sample_id, source, status) VALUES ('s_a', 'x', 'ok'), ('s_b', 'x', 'ok'), "
                    "('s_c', 'x', 'ok')")  # fmt: skip
        con.execute(
            "INSERT INTO rewrites (rewrite_id, sample_id, model_id, settings_hash, attempt, status, output, error, "
            "superseded_by, created_at) VALUES "
            "('r_a1', 's_a', 'm', 'h', 1, 'ok', 'first', NULL, 'r_a2', TIMESTAMP '2024-01-01 10:00'), "
            "('r_a2', 's_a', 'm', 'h', 2, 'ok', 'second', NULL, NULL, TIMESTAMP '2024-01-02 10:00'), "
            "('r_a3', 's_a', 'm', 'h', 3, 'failed', NULL, 'oom', NULL, TIMESTAMP '2024-01-03 10:00'), "
            "('r_b1', 's_b', 'm', 'h', 1, 'ok', 'bee', NULL, NULL, TIMESTAMP '2024-01-01 10:00')"
        )
        con.execute(
            "INSERT INTO decision_settings (settings_hash, thresholds) VALUES ('H1', ?), ('H2', ?)",
            [_thresholds("H1", "v1-old"), _thresholds("H2", "v2-new")],
        )
        # reward v1-old (high) scored first; the reward model changed, v2-new (low) scored later
        con.execute(
            "INSERT INTO scores (rewrite_id, scorer, scorer_version, score, created_at) VALUES "
            "('r_a2', 'reward', 'v1-old', 5.0, TIMESTAMP '2024-01-04'), "
            "('r_a2', 'length', 'v1-len', 7.0, TIMESTAMP '2024-01-04'), "
            "('r_a2', 'reward', 'v2-new', -1.0, TIMESTAMP '2024-01-05'), "
            "('r_b1', 'reward', 'v1-old', 2.0, TIMESTAMP '2024-01-04')"
        )
        con.execute(
            "INSERT INTO decisions (decision_id, rewrite_id, kept, reason, settings_hash, dropped_by, decided_at) VALUES "
            "('d_a2_1', 'r_a2', true, 'kept', 'H1', NULL, TIMESTAMP '2024-01-04 12:00'), "
            "('d_a2_2', 'r_a2', false, 'dropped: reward', 'H2', 'reward', TIMESTAMP '2024-01-05 12:00'), "
            "('d_b1_1', 'r_b1', true, 'kept', 'H1', NULL, TIMESTAMP '2024-01-04 12:00')"
        )
        con.execute(
            "INSERT INTO exports (export_id, format, path, created_at) VALUES "
            "('e_1', 'parquet', '/x/e_1', TIMESTAMP '2024-01-01 12:00'), "
            "('e_2', 'llava', '/x/e_2', TIMESTAMP '2024-01-06 12:00')"
        )
        con.execute("INSERT INTO export_items VALUES ('e_1', 's_a', 'r_a1'), ('e_1', 's_b', 'r_b1'), "
                    "('e_2', 's_b', 'r_b1')")  # fmt: skip


LINEAGE_FACTS = "SELECT sample_id, rewrite_id, attempt, reward, length_score, kept, dropped_by, export_id FROM lineage"


def test_lineage_is_one_row_per_sample_with_the_scores_and_export_of_its_current_rewrite(workspace):
    """The accepted attempt, the score of the scorer version its latest decision read (not the max over
    versions), and an export only if it holds that attempt (s_a's export holds the superseded r_a1)."""
    store = LineageStore(workspace.db_path)
    store.migrate()
    _history(store)
    rows = store.query(LINEAGE_FACTS + " ORDER BY sample_id").to_pylist()
    assert rows == [
        {"sample_id": "s_a", "rewrite_id": "r_a2", "attempt": 2, "reward": -1.0, "length_score": 7.0,
         "kept": False, "dropped_by": "reward", "export_id": None},
        {"sample_id": "s_b", "rewrite_id": "r_b1", "attempt": 1, "reward": 2.0, "length_score": None,
         "kept": True, "dropped_by": None, "export_id": "e_2"},
        {"sample_id": "s_c", "rewrite_id": None, "attempt": None, "reward": None, "length_score": None,
         "kept": None, "dropped_by": None, "export_id": None},
    ]  # fmt: skip
    # thresholds back to H1 (a --rethreshold: a fresh decided_at): its decision read reward v1-old again,
    # although v2-new was scored later
    with store.writer() as con:
        con.execute("UPDATE decisions SET decided_at = TIMESTAMP '2024-01-07' WHERE decision_id = 'd_a2_1'")
    row = store.query(LINEAGE_FACTS + " WHERE sample_id = 's_a'").to_pylist()[0]
    assert (row["reward"], row["kept"]) == (5.0, True)
    # undecided: the score scored last
    with store.writer() as con:
        con.execute("DELETE FROM decisions WHERE rewrite_id = 'r_a2'")
    assert store.query(LINEAGE_FACTS + " WHERE sample_id = 's_a'").to_pylist()[0]["reward"] == -1.0


def test_recent_runs_times_a_running_run_in_utc_whatever_the_local_zone(workspace):
    """``runs.started_at`` is naive UTC (flows.common.utcnow); ``now()::TIMESTAMP`` is local time, so a run that
    started seconds ago showed -17,995 s in New York."""
    store = LineageStore(workspace.db_path)
    store.migrate()
    script = textwrap.dedent(f"""
        from datetime import UTC, datetime, timedelta
        from lineage.queries import recent_runs
        from lineage.store import LineageStore
        store = LineageStore({str(workspace.db_path)!r})
        started = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=5)
        with store.writer() as con:
            con.execute("INSERT INTO runs (run_id, flow, status, started_at) VALUES ('r', 'x', 'running', ?)", [started])
        print(recent_runs(store)[0]["seconds"])
    """)
    import os

    env = {**os.environ, "TZ": "America/New_York"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 4 <= float(out.stdout.strip()) < 120


def test_runs_on_a_narrow_terminal_print_each_run_s_counts_under_it(workspace):
    """At 80 columns the table's summary column was a few characters wide, a dozen lines per run: a narrow
    terminal gets a line per run and its counts wrapped under it, every count whole."""
    import json as _json
    from datetime import datetime

    store = LineageStore(workspace.db_path)
    store.migrate()
    summary = {"selected": 600, "ok": 598, "failed": 2, "tokens_per_s": 1307.25, "model_id": "m_x",
               **{f"count_{i}": i for i in range(12)}}  # fmt: skip
    with store.writer() as con:
        con.execute("INSERT INTO runs (run_id, flow, status, started_at, finished_at, summary) VALUES "
                    "('run_a', 'rewrite', 'completed', ?, ?, ?)",
                    [datetime(2026, 11, 26, 21, 57), datetime(2026, 11, 26, 21, 58), _json.dumps(summary)])  # fmt: skip
    out = subprocess.run([sys.executable, "-c", "from polite.cli import app; app()", "runs", "--workspace", str(workspace.root)],
                         env={**os.environ, "COLUMNS": "80"}, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["run_a", "rewrite", "completed", "11-26", "21:57:00", "60.0", "s"]
    counts = " ".join(line.strip() for line in lines[2:])
    assert all(line.startswith("    ") and len(line) <= 80 for line in lines[2:])
    assert "selected=600, ok=598, failed=2, tokens_per_s=1307" in counts and "count_11=11" in counts
    assert "model_id" not in counts


def test_explain_names_every_run_model_and_image_of_a_sample(workspace):
    """Images in instruction order, one missing from the image store shown as missing (not left out), the models
    that rewrote it, and every run that touched it: ingest, rewrite, filter, export, and the models' training."""
    from lineage.queries import explain

    store = LineageStore(workspace.db_path)
    store.migrate()
    _history(store)
    with store.writer() as con:
        con.execute("UPDATE samples SET images = ['i_b', 'i_gone', 'i_a'], run_id = 'run_ingest' WHERE sample_id = 's_a'")
        con.execute("INSERT INTO images (image_id, path) VALUES ('i_a', 'a.jpg'), ('i_b', 'b.jpg')")
        con.execute("UPDATE rewrites SET run_id = 'run_rewrite'")
        con.execute("UPDATE scores SET run_id = 'run_score'")
        con.execute("UPDATE decisions SET run_id = 'run_decide'")
        con.execute("UPDATE exports SET run_id = 'run_export'")
        # a later export run found the folder done and reused it: it published the sample too
        con.execute("INSERT INTO export_runs (run_id, export_id, published_at) SELECT run_id, export_id, "
                    "TIMESTAMP '2024-01-01' FROM exports UNION ALL SELECT 'run_reexport', export_id, "
                    "TIMESTAMP '2024-01-02' FROM exports")  # fmt: skip
        con.execute("INSERT INTO models (model_id, kind, created_by_run) VALUES ('m', 'rewriter', 'run_train')")
        con.execute(
            "INSERT INTO runs (run_id, flow, status, started_at) SELECT r, 'x', 'completed', "
            "TIMESTAMP '2024-01-01' + INTERVAL (i) HOUR FROM (VALUES ('run_ingest', 1), ('run_train', 2), "
            "('run_rewrite', 3), ('run_score', 4), ('run_decide', 5), ('run_export', 6), ('run_other', 7), "
            "('run_reexport', 8)) t(r, i)"
        )
    report = explain(store, "s_a")
    assert [(i["image_id"], i["path"]) for i in report["images"]] == [("i_b", "b.jpg"), ("i_gone", None), ("i_a", "a.jpg")]
    assert [r["run_id"] for r in report["runs"]] == [
        "run_ingest", "run_train", "run_rewrite", "run_score", "run_decide", "run_export", "run_reexport"
    ]  # fmt: skip
    assert report["exports"] and all(e["published_by"] == ["run_export", "run_reexport"] for e in report["exports"])
    assert [m["model_id"] for m in report["models"]] == ["m"]
    assert [r["rewrite_id"] for r in report["rewrites"]] == ["r_a1", "r_a2", "r_a3"]
    # `current`: the rewrite and the decision the lineage view reads, one of each
    (now,) = store.query("SELECT l.rewrite_id, d.decision_id FROM lineage l JOIN latest_decisions d USING (rewrite_id) "
                         "WHERE l.sample_id = 's_a'").to_pylist()  # fmt: skip
    assert [r["rewrite_id"] for r in report["rewrites"] if r["current"]] == [now["rewrite_id"]]
    assert [d["decision_id"] for d in report["decisions"] if d["current"]] == [now["decision_id"]]
    assert len(report["decisions"]) > 1


def test_sql_writes_list_columns_as_csv_and_explain_prints_every_part(workspace):
    """`polite sql "SELECT * FROM lineage" -f csv` failed with "Unsupported Type: list" (images,
    removed_paragraphs); such columns are written as JSON text."""
    import csv
    import io
    import json

    from typer.testing import CliRunner

    from polite.cli import app

    store = LineageStore(workspace.db_path)
    store.migrate()
    _history(store)
    with store.writer() as con:
        con.execute("UPDATE samples SET images = ['i_b', 'i_a'] WHERE sample_id = 's_a'")
        con.execute("INSERT INTO images (image_id, path) VALUES ('i_a', 'images/a.jpg'), ('i_b', '/abs/b.jpg')")
        con.execute("UPDATE decisions SET removed_paragraphs = [0, 2] WHERE decision_id = 'd_a2_2'")
    ws = ["-w", str(workspace.root)]
    out = CliRunner().invoke(app, ["sql", "SELECT * FROM lineage ORDER BY sample_id", "-f", "csv", *ws])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 3 and json.loads(rows[0]["images"]) == ["i_b", "i_a"]
    assert json.loads(rows[0]["removed_paragraphs"]) == [0, 2] and rows[2]["images"] == ""
    shown = CliRunner().invoke(app, ["explain", "s_a", *ws])
    assert shown.exit_code == 0, shown.output
    assert "models (0)" in shown.output and "rewrites (3)" in shown.output and '"image_id": "i_b"' in shown.output
    assert sum(line.startswith('* {"rewrite_id"') for line in shown.output.splitlines()) == 1
    assert '"selection"' not in shown.output and '"current"' not in shown.output
    as_json = CliRunner().invoke(app, ["explain", "s_a", "--json", *ws])
    assert [(i["path"], i["file"]) for i in json.loads(as_json.stdout)["images"]] == [
        ("/abs/b.jpg", "/abs/b.jpg"), ("images/a.jpg", f"{workspace.root}/images/a.jpg")]  # where each file is now


def test_sql_offers_workspace_path_for_paths_stored_relative_to_a_moved_workspace(workspace, tmp_path):
    """`polite sql` defines workspace_path(path): a relative path under the workspace's root as it is now, an
    absolute path or a URL as it is; a quote in the root is no injection."""
    import csv
    import io
    import shutil

    from typer.testing import CliRunner

    from polite.cli import app
    from polite.workspace import Workspace

    store = LineageStore(workspace.db_path)
    store.migrate()
    with store.writer() as con:
        con.executemany("INSERT INTO images (image_id, path) VALUES (?, ?)",
                        [("i_a", "images/aa/i_a.png"), ("i_b", "/elsewhere/b.png"), ("i_c", "s3://bucket/c.png")])  # fmt: skip
    moved = Workspace.resolve(shutil.move(workspace.root, tmp_path / "it's moved"))
    out = CliRunner().invoke(app, ["sql", "SELECT image_id, workspace_path(path) AS file FROM images ORDER BY 1",
                                   "-f", "csv", "-w", moved.root])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert list(csv.DictReader(io.StringIO(out.stdout))) == [
        {"image_id": "i_a", "file": f"{moved.root}/images/aa/i_a.png"},
        {"image_id": "i_b", "file": "/elsewhere/b.png"},
        {"image_id": "i_c", "file": "s3://bucket/c.png"},
    ]


def test_sql_prints_a_result_too_wide_for_a_table_one_field_a_line(workspace):
    """38 columns of `SELECT * FROM lineage` in a table of 80 characters were cells folded to nothing."""
    from typer.testing import CliRunner

    from polite.cli import app

    store = LineageStore(workspace.db_path)
    store.migrate()
    _history(store)
    out = CliRunner().invoke(app, ["sql", "SELECT * FROM lineage ORDER BY sample_id", "-w", str(workspace.root)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert any(line.split() == ["decision_reason", "dropped:", "reward"] for line in lines), out.output
    assert sum(line.split()[:1] == ["sample_id"] for line in lines) == 3


def test_explain_on_a_database_older_than_the_code_says_how_to_upgrade_it(workspace, monkeypatch):
    """Readers cannot migrate (read-only): explain's queries need migration 008's decision_settings, and failed
    with a traceback on a database no writing command had upgraded yet."""
    import lineage.store as store_module
    from lineage.queries import explain

    real = store_module._migrations
    monkeypatch.setattr(store_module, "_migrations", lambda: [m for m in real() if m[0] < 8])
    monkeypatch.setattr(store_module, "_views_sql", lambda: "SELECT 1")
    store = LineageStore(workspace.db_path)
    store.migrate()
    with store.writer() as con:
        con.execute("INSERT INTO samples (sample_id, source, status) VALUES ('s_a', 'x', 'ok')")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"not yet upgraded.*008_decision_settings.sql.*polite ingest"):
        explain(store, "s_a")
    # `polite sql` over a table or column a pending migration adds says the same, not "does not exist"
    for sql in ("SELECT * FROM decision_settings", "SELECT duplicate_of FROM samples"):
        with pytest.raises(ValueError, match=r"not yet upgraded.*009_.*polite ingest"):
            store.user_query(sql)
    store.migrate()
    assert explain(store, "s_a")["sample"]["sample_id"] == "s_a"
    with pytest.raises(duckdb.CatalogException):  # an up-to-date database: the user's own mistake, as it was
        store.user_query("SELECT * FROM no_such_table")


def test_a_user_query_past_its_time_limit_is_stopped_so_flows_can_write(workspace):
    """While `polite sql` has the file open no flow can write it, and a flow's writer waits LOCK_TIMEOUT_S at
    most: a query is stopped at its time limit with what to do, and the file is free for a writer at once."""
    from lineage.store import LOCK_TIMEOUT_S, QueryTimeLimitError

    store = LineageStore(workspace.db_path)
    store.migrate()
    endless = "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"
    started = time.monotonic()
    with pytest.raises(QueryTimeLimitError, match=r"stopped after 0.5 s.*a flow waits 120 s at most.*--time-limit"):
        store.user_query(endless, time_limit_s=0.5)
    assert time.monotonic() - started < 30 and LOCK_TIMEOUT_S == 120
    with LineageStore(workspace.db_path, lock_timeout_s=1).writer() as con:  # the reader let go of the file
        con.execute("SELECT 1")
    # a query within its limit answers as before
    assert store.user_query("SELECT 42 AS n", time_limit_s=5).to_pylist() == [{"n": 42}]


def test_stored_timestamps_are_utc_whatever_the_machine_s_zone(workspace):
    """Column defaults (`created_at` of rewrites, scores, exports, ...) follow the session's time zone, the
    machine's, while the flows write runs and decisions in UTC: every connection is set to UTC, so "latest"
    orderings and the times users query agree."""
    store = LineageStore(workspace.db_path)
    store.migrate()
    script = textwrap.dedent(f"""
        from datetime import UTC, datetime
        import pyarrow as pa
        from lineage.store import LineageStore
        store = LineageStore({str(workspace.db_path)!r})
        store.ingest_arrow("exports", pa.table({{"export_id": ["x_1"], "format": ["pf1m"], "path": ["/x"]}}))
        stored = store.query("SELECT created_at FROM exports").to_pylist()[0]["created_at"]
        print(abs((datetime.now(UTC).replace(tzinfo=None) - stored).total_seconds()))
    """)
    env = {**os.environ, "TZ": "Pacific/Kiritimati"}  # UTC+14: a local-time default is 14 hours off
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 60
