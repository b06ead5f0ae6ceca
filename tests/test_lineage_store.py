"""The DuckDB lineage store: schema, idempotent bulk ingest, read-only guard, and two real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from lineage.store import LineageStore, ReadOnlyQueryError, check_read_only_sql
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
