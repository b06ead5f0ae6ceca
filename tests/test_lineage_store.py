"""The DuckDB lineage store: schema, idempotent bulk ingest, read-only guard, and two real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

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
    ],
)
def test_user_sql_refuses_anything_but_one_select(sql):
    with pytest.raises(ReadOnlyQueryError):
        check_read_only_sql(sql)


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
        with pytest.raises(LineageLockedError, match="locked by another process"):
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
    ):
        with pytest.raises(PredicateError, match="train.pairs_where"):
            store.check_predicate(bad, "samples s", "train.pairs_where")
    assert len(store.query("SELECT * FROM samples")) == 3


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
