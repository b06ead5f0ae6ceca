"""The `runs` table says why a run failed, and tells a run whose process died from one still going."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lineage.store import LineageStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(started_workspace):
    """Every test here records stage runs, which need the database ingest would have made."""
    return started_workspace


def _runs(workspace) -> dict[str, dict]:
    rows = LineageStore(workspace.db_path).query("SELECT * FROM runs").to_pylist()
    return {r["run_id"]: r for r in rows}


def test_a_failed_stage_records_its_error_and_a_finished_one_none(workspace):
    from flows.common import stage_run
    from polite.config import ConfigError

    with stage_run("filter", {}, workspace) as ok:
        ok.count("decided", 3)
    with pytest.raises(ConfigError), stage_run("rewrite", {}, workspace) as bad:
        raise ConfigError("rewrite.device: 'cuda' but no GPU is visible; set rewrite.device: cpu")
    runs = _runs(workspace)
    assert runs[ok.run_id]["status"] == "completed" and runs[ok.run_id]["error"] is None
    assert runs[bad.run_id]["status"] == "failed"
    assert runs[bad.run_id]["error"] == "ConfigError: rewrite.device: 'cuda' but no GPU is visible; set rewrite.device: cpu"
    assert {(r["host"], r["pid"]) for r in runs.values()} == {(os.uname().nodename, os.getpid())}


def test_a_run_whose_process_was_killed_reads_interrupted_and_the_next_run_records_it(workspace, tmp_path):
    """kill -9 leaves the row 'running' for ever. `polite runs` shows it interrupted at once, with no duration
    (when it stopped is unknown); the next run on the host writes that down, so SQL sees it too. A run of
    another host, whose process cannot be seen from here, is left running."""
    from typer.testing import CliRunner

    from flows.common import stage_run
    from lineage.queries import recent_runs
    from polite.cli import app

    store = LineageStore(workspace.db_path)
    store.migrate()
    with store.writer() as con:
        con.execute("INSERT INTO runs (run_id, flow, status, started_at, host, pid) "
                    "VALUES ('run_far', 'rewrite', 'running', now(), 'gpu-box-7', 4242)")  # fmt: skip
    script = (
        "import sys, time; from flows.common import stage_run\n"
        "with stage_run('rewrite', {}, sys.argv[1]) as run:\n"
        "    print(run.run_id, flush=True); time.sleep(300)\n"
    )
    victim = subprocess.Popen([sys.executable, "-c", script, workspace.root], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        killed = victim.stdout.readline().strip()
        assert recent_runs(store)[0]["run_id"] == killed and recent_runs(store)[0]["status"] == "running"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    shown = {r["run_id"]: r for r in recent_runs(store)}
    assert shown[killed]["status"] == "interrupted" and shown[killed]["seconds"] is None
    assert shown[killed]["error"].startswith("the process ended without recording an outcome")
    assert shown["run_far"]["status"] == "running"
    assert _runs(workspace)[killed]["status"] == "running"  # only shown so far: a reader writes nothing

    out = CliRunner().invoke(app, ["runs", "-w", workspace.root], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert f"{killed}  rewrite         interrupted" in out.output and "  -\n" in out.output
    assert "    error: the process ended without recording an outcome" in out.output

    with stage_run("filter", {}, workspace):
        pass
    runs = _runs(workspace)
    assert runs[killed]["status"] == "interrupted" and runs[killed]["error"] == shown[killed]["error"]
    assert runs["run_far"]["status"] == "running"
    # recorded as interrupted (with no end time), it still has no duration: it did not run until now
    assert {r["run_id"]: r for r in recent_runs(LineageStore(workspace.db_path))}[killed]["seconds"] is None


def test_polite_runs_shows_why_a_run_failed_and_reads_a_database_older_than_the_columns(workspace):
    from typer.testing import CliRunner

    from flows.common import stage_run
    from polite.cli import app
    from polite.config import ConfigError

    with pytest.raises(ConfigError), stage_run("export", {}, workspace) as bad:
        raise ConfigError("export check min_keep_rate: kept 2% of 600 rewrites, needs 5%;\nrelax it or filter again")
    for columns in ("80", "200"):  # the narrow terminal's lines and the wide one's table
        out = CliRunner().invoke(app, ["runs", "-w", workspace.root], env={"COLUMNS": columns})
        assert out.exit_code == 0, out.output
        assert "error: ConfigError: export check min_keep_rate: kept 2% of 600" in out.output, out.output
        assert bad.run_id in out.output

    store = LineageStore(workspace.db_path)
    with store.writer() as con:  # as a database written before migration 011 is
        for column in ("error", "host", "pid"):
            con.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    out = CliRunner().invoke(app, ["runs", "-w", workspace.root], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert f"{bad.run_id}  export          failed" in out.output and "error:" not in out.output


def test_a_running_stage_writes_its_shard_progress_and_drops_it_once_completed(workspace, prefect_harness, monkeypatch):
    """Another terminal sees how far a run is: each shard's progress reaches the run's row (at most every
    PROGRESS_EVERY_S; 0 here), then the completed row keeps only its counts. A failed run keeps how far it got."""
    from prefect import flow, task

    import flows.common
    from flows.common import ShardFailures, map_shards, stage_run

    monkeypatch.setattr(flows.common, "PROGRESS_EVERY_S", 0.0)
    seen: list[dict] = []

    @task
    def square(n: int) -> int:
        if n == 99:
            raise ValueError("a poisoned shard")
        return n * n

    @flow
    def stage(items: list[int]) -> str:
        with stage_run("filter", {}, workspace) as run:
            run.summary["selected"] = len(items)

            def ingest(result: int) -> None:
                import json as _json

                row = LineageStore(workspace.db_path).query("SELECT status, summary FROM runs WHERE run_id = $id",
                                                            params={"id": run.run_id}).to_pylist()[0]  # fmt: skip
                seen.append({"status": row["status"], **_json.loads(row["summary"] or "{}")})
                run.count("sum", result)

            map_shards(square, items, ingest, "squares", stage=run)
        return run.run_id

    run_id = stage([1, 2, 3])
    # before each ingest: the shards done until then (the first had nothing written yet)
    assert [(s["status"], s.get("shards_done"), s.get("shards_total")) for s in seen] == [
        ("running", None, None), ("running", 1, 3), ("running", 2, 3)]  # fmt: skip
    assert seen[2]["sum"] in (1 + 4, 1 + 9, 4 + 9)  # the counts so far ride along: two shards, whichever came first
    import json as _json

    final = _json.loads(_runs(workspace)[run_id]["summary"])
    assert final == {"selected": 3, "sum": 14}

    with pytest.raises(ShardFailures):
        stage([1, 99])
    failed = [r for r in _runs(workspace).values() if r["status"] == "failed"]
    assert len(failed) == 1 and _json.loads(failed[0]["summary"])["shards_done"] == 2


def test_polite_runs_shows_a_running_run_s_shards_and_the_time_left(workspace):
    import json as _json
    from datetime import timedelta

    from typer.testing import CliRunner

    from flows.common import utcnow
    from lineage.queries import recent_runs
    from polite.cli import app

    store = LineageStore(workspace.db_path)
    store.migrate()
    started = utcnow() - timedelta(minutes=30)
    with store.writer() as con:
        con.execute("INSERT INTO runs (run_id, flow, status, started_at, host, pid, summary) VALUES "
                    "('run_live', 'rewrite', 'running', ?, ?, ?, ?)",
                    [started, os.uname().nodename, os.getpid(),
                     _json.dumps({"selected": 120000, "shards_done": 10, "shards_total": 60})])  # fmt: skip
    (row,) = recent_runs(store)
    assert row["status"] == "running" and 149 * 60 < row["left_s"] < 151 * 60  # 30 min for 10 of 60 shards
    for columns in ("80", "200"):
        out = CliRunner().invoke(app, ["runs", "-w", workspace.root], env={"COLUMNS": columns})
        assert out.exit_code == 0 and "10/60 shards, about 2 h 30 min left" in out.output, out.output


def test_a_progress_note_that_cannot_get_the_file_is_skipped_not_fatal(workspace, monkeypatch):
    """Another process holding the database (a long `polite sql`) delays a progress note by PROGRESS_WAIT_S at
    most, and the run goes on; the next note, or the run's end, records the counts."""
    import json as _json

    import flows.common
    from flows.common import stage_run

    monkeypatch.setattr(flows.common, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(flows.common, "PROGRESS_WAIT_S", 0.3)
    with stage_run("filter", {}, workspace) as run:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
             "print('held', flush=True); time.sleep(300)", str(workspace.db_path)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout.readline().strip() == "held"
            run.progress(1, 4)  # waits 0.3 s, then gives up
        finally:
            holder.kill()
            holder.wait(timeout=30)
        assert _json.loads(_runs(workspace)[run.run_id]["summary"] or "{}") == {}  # that note was skipped
        run.progress(2, 4)
        assert _json.loads(_runs(workspace)[run.run_id]["summary"]) == {"shards_done": 2, "shards_total": 4}


def test_runs_filter_by_flow_and_status_an_interrupted_one_included(workspace):
    from datetime import timedelta

    from typer.testing import CliRunner

    from flows.common import utcnow
    from lineage.queries import recent_runs
    from polite.cli import app

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, here = int(gone.stdout), os.uname().nodename
    store = LineageStore(workspace.db_path)
    store.migrate()
    t = utcnow() - timedelta(hours=1)
    rows = [("run_a", "rewrite", "completed", None), ("run_b", "rewrite", "failed", None),
            ("run_c", "filter", "failed", None), ("run_d", "rewrite", "running", dead_pid),
            ("run_e", "rewrite", "running", os.getpid())]  # fmt: skip
    with store.writer() as con:
        con.executemany("INSERT INTO runs (run_id, flow, status, started_at, host, pid) VALUES (?, ?, ?, ?, ?, ?)",
                        [(r, f, s, t + timedelta(minutes=k), here, pid) for k, (r, f, s, pid) in enumerate(rows)])  # fmt: skip
    ids = lambda **kw: [r["run_id"] for r in recent_runs(store, **kw)]  # noqa: E731
    assert ids(status="failed") == ["run_c", "run_b"]
    assert ids(status="failed", flow="rewrite") == ["run_b"] and ids(flow="filter") == ["run_c"]
    assert ids(status="interrupted") == ["run_d"] and ids(status="running") == ["run_e"]
    assert ids(flow="rewrite", limit=2) == ["run_e", "run_d"] and ids(status="failed", limit=1) == ["run_c"]
    with pytest.raises(ValueError, match="unknown run status 'done'; one of running, completed, failed, interrupted"):
        recent_runs(store, status="done")
    # a flow with no runs yet lists nothing; a name no flow has is a typo
    assert ids(flow="export") == []
    with pytest.raises(ValueError, match=r"--flow: unknown flow 'rewirte' \(did you mean 'rewrite'\?\); known: distort"):
        recent_runs(store, flow="rewirte")
    assert CliRunner().invoke(app, ["runs", "-w", workspace.root, "--limit", "0"]).exit_code == 2
    out = CliRunner().invoke(app, ["runs", "-w", workspace.root, "--flow", "rewrite", "--status", "interrupted"],
                             env={"COLUMNS": "80"})  # fmt: skip
    assert out.exit_code == 0 and "run_d" in out.output and "run_e" not in out.output, out.output


def test_a_run_stopped_by_ctrl_c_is_recorded_interrupted_not_failed(workspace):
    from flows.common import stage_run

    with pytest.raises(KeyboardInterrupt), stage_run("rewrite", {}, workspace) as stopped:
        raise KeyboardInterrupt
    row = _runs(workspace)[stopped.run_id]
    assert row["status"] == "interrupted" and row["finished_at"] is not None
    assert row["error"] == "KeyboardInterrupt: stopped (Ctrl-C or a termination signal)"


def test_a_run_s_short_settings_show_beside_its_counts():
    """Two export runs that differ only in `dedupe` looked the same in `polite runs`: short strings show, long
    ones (ids, hashes, paths) stay in SQL."""
    from polite.cli.lineage import compact_summary

    summary = {"dedupe": "response", "n_items": 43, "settings_hash": "f" * 16, "report": "reports/export-1/r.md",
               "ok": True, "skipped": "filters.enabled is false", "seconds": 1.23456}  # fmt: skip
    assert compact_summary(summary) == "dedupe=response, n_items=43, seconds=1.235"
