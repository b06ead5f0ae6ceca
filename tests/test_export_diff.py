"""`polite diff` / `export_diff(a, b)`: what changed between two published datasets, and why."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from typer.testing import CliRunner

from lineage.queries import CHANGES, export_diff
from lineage.store import LineageStore
from polite.cli import app

T0 = datetime(2026, 11, 20, 9, 0)


def _lineage_with_two_exports(workspace) -> LineageStore:
    """Export A (run_a, two formats) publishes s1, s2, s3, s6. Then s2 is rewritten (kept), s3's rewrite is dropped
    by the semantic filter, s4 (there all along, dropped before) is kept under new thresholds, s5 is ingested and
    kept, s6's rewrite is re-decided with a paragraph cut (a CLIPScore threshold), and s7 is rerun to the same
    text. Export B (run_b) publishes s1, s2's new rewrite, s4, s5, s6's cut text and s7's new rewrite."""
    store = LineageStore(workspace.db_path)
    store.migrate()
    later = T0 + timedelta(days=1)
    with store.writer() as con:
        con.executemany("INSERT INTO samples (sample_id, source, task_type, status, ingested_at) VALUES (?, ?, ?, 'ok', ?)",
                        [("s1", "gqa", "vqa", T0), ("s2", "gqa", "vqa", T0), ("s3", "vqav2", "vqa", T0),
                         ("s4", "vqav2", "vqa", T0), ("s5", "vqav2", "vqa", later), ("s6", "gqa", "caption", T0),
                         ("s7", "gqa", "vqa", T0)])  # fmt: skip
        rewrites = [("r1", "s1", 1, T0, "The answer is two."), ("r2", "s2", 1, T0, "It is red."),
                    ("r3", "s3", 1, T0, "A cat."), ("r4", "s4", 1, T0, "Yes, it is raining."),
                    ("r2b", "s2", 2, later, "The car is red."), ("r5", "s5", 1, later, "Three people."),
                    ("r6", "s6", 1, T0, "It is a car.\n\nThe sky is green."), ("r7", "s7", 1, T0, "Two dogs."),
                    ("r7b", "s7", 2, later, "Two dogs.")]  # fmt: skip
        con.executemany("INSERT INTO rewrites (rewrite_id, sample_id, model_id, settings_hash, attempt, status, "
                        "created_at, output) VALUES (?, ?, 'm', 'h', ?, 'ok', ?, ?)", rewrites)  # fmt: skip
        decisions = [("r1", True, None, T0, None), ("r2", True, None, T0, None), ("r3", True, None, T0, None),
                     ("r4", False, "nli", T0, None), ("r6", True, None, T0, None), ("r3", False, "semantic", later, None),
                     ("r4", True, None, later, None), ("r2b", True, None, later, None), ("r5", True, None, later, None),
                     ("r6", True, None, later, "It is a car."), ("r7", True, None, T0, None),
                     ("r7b", True, None, later, None)]  # fmt: skip
        con.executemany("INSERT INTO decisions (decision_id, rewrite_id, kept, reason, dropped_by, decided_at, "
                        "final_output) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(f"d{i}", r, kept, "kept" if kept else f"dropped: {by}", by, at, final)
                         for i, (r, kept, by, at, final) in enumerate(decisions)])  # fmt: skip
        exports = [("x_a1", "pf1m", "run_a", 5, T0 + timedelta(hours=1)), ("x_a2", "llava", "run_a", 5, T0 + timedelta(hours=1)),
                   ("x_b1", "pf1m", "run_b", 6, later + timedelta(hours=1)), ("x_b2", "llava", "run_b", 6, later + timedelta(hours=1))]  # fmt: skip
        con.executemany("INSERT INTO exports (export_id, format, path, run_id, n_items, created_at) "
                        "VALUES (?, ?, 'exports/x', ?, ?, ?)", exports)  # fmt: skip
        items = {"run_a": [("s1", "r1"), ("s2", "r2"), ("s3", "r3"), ("s6", "r6"), ("s7", "r7")],
                 "run_b": [("s1", "r1"), ("s2", "r2b"), ("s4", "r4"), ("s5", "r5"), ("s6", "r6"), ("s7", "r7b")]}  # fmt: skip
        con.executemany("INSERT INTO export_runs VALUES (?, ?, ?)", [(run, x, at) for x, _, run, _, at in exports])
        con.executemany("INSERT INTO export_items VALUES (?, ?, ?)",
                        [(x, s, r) for x, _, run, _, _ in exports for s, r in items[run]])  # fmt: skip
    return store


def test_each_sample_s_change_and_why_a_removed_one_is_out(workspace):
    store = _lineage_with_two_exports(workspace)
    rows = store.query("SELECT sample_id, change, rewrite_a, rewrite_b, dropped_by_now, new_sample "
                       "FROM export_diff('run_a', 'run_b') ORDER BY sample_id").to_pylist()  # fmt: skip
    assert [(r["sample_id"], r["change"], r["rewrite_a"], r["rewrite_b"]) for r in rows] == [
        ("s1", "same", "r1", "r1"), ("s2", "rewritten", "r2", "r2b"), ("s3", "removed", "r3", None),
        ("s4", "added", None, "r4"), ("s5", "added", None, "r5"), ("s6", "recut", "r6", "r6"),
        ("s7", "redone", "r7", "r7b")]  # fmt: skip
    assert [r["new_sample"] for r in rows if r["change"] == "added"] == [False, True]
    assert rows[2]["dropped_by_now"] == "semantic"
    # one export of a run names the same items as its run
    assert store.query("SELECT count(*) AS n FROM export_diff('x_a2', 'x_b1') WHERE change = 'same'").to_pylist() == [{"n": 1}]

    report = export_diff(store, show=1)  # no ids: the export run before the latest, against the latest
    assert (report["a"]["ref"], report["b"]["ref"]) == ("run_a", "run_b")
    assert report["a"]["formats"] == ["llava", "pf1m"] and report["b"]["n_items"] == 6
    assert report["counts"] == {"added": 2, "removed": 1, "rewritten": 1, "redone": 1, "recut": 1, "same": 1}
    assert report["new_samples"] == 1
    assert report["by_source"] == [
        {"source": "gqa", "added": 0, "removed": 0, "rewritten": 1, "redone": 1, "recut": 1, "same": 1},
        {"source": "vqav2", "added": 2, "removed": 1, "rewritten": 0, "redone": 0, "recut": 0, "same": 0}]  # fmt: skip
    assert report["removed_why"] == [{"why": "dropped by semantic", "n": 1}]
    assert report["examples"] == [
        {"change": "added", "sample_id": "s4", "source": "vqav2", "text_a": None, "text_b": "Yes, it is raining."},
        # the text each export published: the whole rewrite, then what the cut kept
        {"change": "recut", "sample_id": "s6", "source": "gqa", "text_a": "It is a car.\n\nThe sky is green.",
         "text_b": "It is a car."},
        {"change": "redone", "sample_id": "s7", "source": "gqa", "text_a": "Two dogs.", "text_b": "Two dogs."},
        {"change": "removed", "sample_id": "s3", "source": "vqav2", "text_a": "A cat.", "text_b": None},
        {"change": "rewritten", "sample_id": "s2", "source": "gqa", "text_a": "It is red.", "text_b": "The car is red."},
    ]  # fmt: skip
    backwards = export_diff(store, "run_b", "run_a")
    assert backwards["counts"] == {"added": 1, "removed": 2, "rewritten": 1, "redone": 1, "recut": 1, "same": 1}
    # s4 and s5 are kept now: what left them out is a's selection (it was made before they were kept)
    assert backwards["removed_why"] == [{"why": "kept, outside b's selection", "n": 2}]
    assert export_diff(store, "x_a1")["b"]["ref"] == "run_b"  # one id: against the latest


def test_polite_diff_prints_the_counts_per_source_why_and_examples(workspace):
    _lineage_with_two_exports(workspace)
    out = CliRunner().invoke(app, ["diff", "-w", workspace.root, "--show", "1"], env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "   run_a (llava, pf1m: 5 items, 2026-11-20 10:00 UTC)"
    assert lines[1] == "-> run_b (llava, pf1m: 6 items, 2026-11-21 10:00 UTC)"
    assert lines[2] == ("added 2 (1 new samples), removed 1, rewritten 1, redone 1 (a new rewrite, the same text), "
                        "recut 1 (the same rewrite, other paragraphs kept), same 1")
    assert "= s7 gqa: 'Two dogs.'\n" in out.output
    assert "removed, why (the lineage now): dropped by semantic 1" in out.output
    assert "~ s2 gqa: 'It is red.' -> 'The car is red.'" in out.output and "- s3 vqav2: 'A cat.'" in out.output
    assert "% s6 gqa: 'It is a car. The sky is green.' -> 'It is a car.'" in out.output
    as_json = CliRunner().invoke(app, ["diff", "x_a1", "x_b2", "-w", workspace.root, "--json"])
    assert json.loads(as_json.output)["counts"]["rewritten"] == 1
    in_sql = CliRunner().invoke(app, ["sql", "SELECT sample_id FROM export_diff('run_a', 'run_b') WHERE change = "
                                      "'removed'", "-w", workspace.root, "--format", "json"])  # fmt: skip
    assert in_sql.exit_code == 0 and json.loads(in_sql.output) == {"sample_id": "s3"}, in_sql.output


@pytest.mark.parametrize("args, says", [
    (["nope", "run_b"], "no export and no export run with id 'nope'"),
    (["run_a", "x_zz"], "no export and no export run with id 'x_zz'"),
])  # fmt: skip
def test_an_unknown_id_is_one_line_naming_it(workspace, args, says):
    _lineage_with_two_exports(workspace)
    out = CliRunner().invoke(app, ["diff", *args, "-w", workspace.root])
    assert out.exit_code == 2 and says in out.output and "Traceback" not in out.output, out.output


def test_one_export_run_is_not_enough_to_diff(workspace):
    store = LineageStore(workspace.db_path)
    store.migrate()
    with store.writer() as con:
        con.execute("INSERT INTO exports (export_id, format, path, run_id, n_items) VALUES ('x_1', 'pf1m', 'e', 'run_1', 0)")
        con.execute("INSERT INTO export_runs (run_id, export_id) VALUES ('run_1', 'x_1')")
    out = CliRunner().invoke(app, ["diff", "-w", workspace.root])
    assert out.exit_code == 2 and "needs two exports to compare; this workspace has 1 export run" in out.output
    assert export_diff(store, "x_1", "run_1")["counts"] == {c: 0 for c in CHANGES}


def test_a_workspace_whose_views_predate_the_diff_says_how_to_get_it(workspace):
    store = _lineage_with_two_exports(workspace)
    with store.writer() as con:
        con.execute("DROP MACRO TABLE export_diff")  # as views written by an older version are
    out = CliRunner().invoke(app, ["diff", "-w", workspace.root])
    assert out.exit_code == 2 and "views predate `polite diff`: any command that writes the lineage" in out.output
    store.migrate()  # what any writing command does first
    assert export_diff(store)["counts"]["same"] == 1
