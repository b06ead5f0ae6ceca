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
