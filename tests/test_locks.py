"""polite/locks.py: a held lock stops a second holder with who holds it; a probe looks without taking it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from polite.locks import WorkspaceBusy, exclusive, probe

REPO = Path(__file__).resolve().parents[1]


def test_a_probe_of_a_free_lock_takes_nothing_and_names_no_holder(tmp_path):
    db = tmp_path / "lineage.duckdb"
    probe(db, "rewrite-x", "a rewrite")
    assert not (tmp_path / "locks" / "rewrite-x.holder").exists()
    with exclusive(db, "rewrite-x", "a rewrite"):  # nothing was left held
        assert (tmp_path / "locks" / "rewrite-x.holder").exists()


def test_a_held_lock_stops_a_holder_and_a_probe_alike_and_the_probe_leaves_the_holder_named(tmp_path):
    db = tmp_path / "lineage.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from polite.locks import exclusive\n"
         "with exclusive(Path(sys.argv[1]), 'rewrite-x', 'a rewrite'):\n    print('held', flush=True); time.sleep(300)",
         str(db)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        named = (tmp_path / "locks" / "rewrite-x.holder").read_text()
        for attempt in (lambda: probe(db, "rewrite-x", "a rewrite"),
                        lambda: exclusive(db, "rewrite-x", "a rewrite").__enter__()):  # fmt: skip
            with pytest.raises(WorkspaceBusy, match=rf"a rewrite is already running in this workspace \(pid {holder.pid} on "):
                attempt()
        assert (tmp_path / "locks" / "rewrite-x.holder").read_text() == named
    finally:
        holder.kill()
        holder.wait(timeout=30)
    probe(db, "rewrite-x", "a rewrite")  # the OS dropped it with its holder


def test_a_busy_workspace_exits_75_so_a_scheduler_retries_and_a_bad_config_still_exits_2(tmp_path):
    """Exit 2 says "fix your config", 75 (EX_TEMPFAIL) "another run holds the workspace: try again later". Here
    `polite run` (the demo config: training first) meets a training another process is running."""
    import os

    from lineage.store import LineageStore

    ws = tmp_path / "ws"
    LineageStore(ws / "lineage.duckdb").migrate()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from polite.locks import exclusive\n"
         "with exclusive(Path(sys.argv[1]), 'train', 'a rewriter training'):\n    print('held', flush=True); time.sleep(300)",
         str(ws / "lineage.duckdb")],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    polite = [str(Path(sys.executable).parent / "polite"), "run", "-w", str(ws)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = subprocess.run(polite, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        bad = subprocess.run([*polite, "--set", "rewrite.preset=fastest"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert busy.returncode == 75, busy.stdout + busy.stderr
    assert f"a rewriter training is already running in this workspace (pid {holder.pid} on " in busy.stderr
    assert "(exit code 75: busy, try again later)" in busy.stderr and "Traceback" not in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    assert bad.returncode == 2 and "rewrite.preset" in bad.stderr, bad.stdout + bad.stderr


def test_the_lineage_database_held_too_long_is_busy_too_and_other_user_errors_are_not():
    from lineage.store import LineageLockedError
    from polite.cli.common import user_errors
    from polite.config import ConfigError

    def failing(exc):
        @user_errors
        def command():
            raise exc

        with pytest.raises(SystemExit) as ended:
            command()
        return ended.value.code

    assert failing(LineageLockedError("lineage.duckdb stayed locked by another process for 120s")) == 75
    assert failing(WorkspaceBusy("a rewrite is already running in this workspace")) == 75
    assert failing(ConfigError("rewrite.preset: no such preset")) == 2
