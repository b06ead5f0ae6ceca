"""Duplicate items of an export: counted in every export (result, run summary, card, command output), dropped on
request by `export.dedupe`, and part of the export id; the default leaves items and ids as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from test_export_flow import populate

QUIET = {"export": {"report": "none"}}  # the report is tested in test_export_flow; here it is only a second
KEPT = ["s_coco_0", "s_coco_1", "s_coco_3", "s_gqa_0", "s_gqa_2"]


def populate_with_duplicates(ws):
    """The export fixture's 5 kept items, with duplicates (sample_id order: coco_0, coco_1, coco_3, gqa_0, gqa_2):
    coco_3 has coco_0's image, instruction and (CLIPScore-cut) response, in other whitespace: an exact duplicate;
    coco_1 (another image) and gqa_2 (gqa_0's response, another image) repeat an earlier item's response."""
    store = populate(ws)
    with store.writer() as con:
        con.execute("UPDATE rewrites SET output = ? WHERE rewrite_id = 'r_s_coco_3_1'",
                    ["The image  shows a dog on a couch,\nseen clearly. "])  # fmt: skip
        con.execute("UPDATE rewrites SET output = 'The image shows a dog on a couch, seen clearly.' "
                    "WHERE rewrite_id = 'r_s_coco_1_1'")  # fmt: skip
        con.execute("UPDATE rewrites SET output = 'The object is red.' WHERE rewrite_id = 'r_s_gqa_2_2'")
    return store


def _items(out: dict, fmt: str = "pf1m") -> list[str]:
    folder = Path(out["exports"][fmt]["path"])
    return sorted(r["id"] for f in folder.glob("*.json") if f.name != "_SUCCESS.json" for r in json.loads(f.read_text()))


def test_every_export_counts_its_duplicates_and_keeps_them_by_default(workspace, prefect_harness):
    from flows.export import content_digest, export_id_for, select, selection_sql
    from tasks.export import LAYOUT_VERSION

    store = populate_with_duplicates(workspace)
    out = export_flow_quiet(workspace)
    assert _items(out) == KEPT and out["n_items"] == 5
    assert (out["exact_duplicates"], out["response_repeats"], out["dropped_duplicates"]) == (1, 3, 0)
    assert out["dedupe"] == "none" and out["exported_response_repeats"] == 3
    # the export's lineage record: its run's summary
    (summary,) = store.query("SELECT summary FROM runs WHERE flow = 'export'").column("summary").to_pylist()
    expected = {"exact_duplicates": 1, "response_repeats": 3, "dropped_duplicates": 0, "n_selected": 5, "dedupe": "none"}
    assert expected.items() <= json.loads(summary).items()
    card = Path(out["exports"]["pf1m"]["path"], "README.md").read_text()
    assert "- 1 are exact duplicates of an earlier item" in card
    assert "- 3 repeat an earlier item's response, whatever their images and instruction (2 distinct responses)" in card
    assert "`export.dedupe: none`: every one is in this export" in card
    assert '- 3: "The image shows a dog on a couch, seen clearly."' in card  # the most repeated, whitespace normalised
    # dedupe off: the selection, its SQL and so the export id are what they were before duplicates were counted
    assert LAYOUT_VERSION == 2 and out["selection"] == selection_sql(None)
    digest = content_digest(select(store, selection_sql(None)))
    assert out["exports"]["pf1m"]["export_id"] == export_id_for(selection_sql(None), "pf1m", digest, "link")
    assert out["duplicate_warning"].startswith("3 of 5 exported items (60%) repeat an earlier item's response")
    assert "export.dedupe: response" in out["duplicate_warning"]


def export_flow_quiet(workspace, **kwargs) -> dict:
    from flows.export import export_flow

    return export_flow(config=QUIET, workspace=workspace.root, formats=kwargs.pop("formats", ["pf1m"]), **kwargs)


@pytest.mark.parametrize(
    ("dedupe", "kept", "repeats"),
    [("exact", ["s_coco_0", "s_coco_1", "s_gqa_0", "s_gqa_2"], 2), ("response", ["s_coco_0", "s_gqa_0"], 0)],
)
def test_dedupe_drops_the_later_duplicates_and_records_what_it_exported(workspace, prefect_harness, dedupe, kept,
                                                                         repeats):  # fmt: skip
    store = populate_with_duplicates(workspace)
    default = export_flow_quiet(workspace, formats=["pf1m", "llava"])
    out = export_flow_quiet(workspace, formats=["pf1m", "llava"], dedupe=dedupe)
    assert _items(out) == _items(out, "llava") == kept and out["n_items"] == len(kept)
    assert (out["exact_duplicates"], out["response_repeats"]) == (1, 3)  # what the selection held
    assert out["dropped_duplicates"] == 5 - len(kept) and out["exported_response_repeats"] == repeats
    assert (out["duplicate_warning"] is None) == (repeats / len(kept) <= 0.10)
    for fmt in ("pf1m", "llava"):  # a changed setting is another export, beside the first
        assert out["exports"][fmt]["export_id"] != default["exports"][fmt]["export_id"]
        assert Path(default["exports"][fmt]["path"], "_SUCCESS.json").is_file()
    ids = out["exports"]["pf1m"]["export_id"]
    recorded = store.query(f"SELECT sample_id FROM export_items WHERE export_id = '{ids}' ORDER BY 1")
    assert recorded.column("sample_id").to_pylist() == kept
    # the recorded selection is SQL over the lineage that gives exactly the exported items
    (sql,) = store.query(f"SELECT selection FROM exports WHERE export_id = '{ids}'").column("selection").to_pylist()
    assert "= 1\nORDER BY sample_id" in sql and store.query(sql).column("sample_id").to_pylist() == kept
    card = Path(out["exports"]["pf1m"]["path"], "README.md").read_text()
    assert f"`export.dedupe: {dedupe}` dropped {5 - len(kept)} of them, keeping the first item of each group" in card
    assert "QUALIFY row_number() OVER (PARTITION BY" in card  # the card's lineage query is the deduped one
    # the same setting again finds its folders done
    assert export_flow_quiet(workspace, formats=["pf1m", "llava"], dedupe=dedupe)["exports"] == out["exports"]


def test_the_setting_is_a_new_export_even_when_nothing_is_dropped(workspace, prefect_harness):
    store = populate(workspace)
    with store.writer() as con:  # the fixture's coco_3 duplicates coco_0 (same caption, image and instruction)
        con.execute("UPDATE rewrites SET output = 'A dog asleep on a couch.' WHERE rewrite_id = 'r_s_coco_3_1'")
    default = export_flow_quiet(workspace)
    exact = export_flow_quiet(workspace, dedupe="exact")
    assert _items(exact) == _items(default) == KEPT and exact["dropped_duplicates"] == 0
    assert exact["exports"]["pf1m"]["export_id"] != default["exports"]["pf1m"]["export_id"]
    assert default["duplicate_warning"] is None and default["response_repeats"] == 0
    card = Path(exact["exports"]["pf1m"]["path"], "README.md").read_text()
    assert "`export.dedupe: exact` dropped 0 of them" in card and "Most repeated responses" not in card


def test_the_config_setting_is_typed_and_read_by_the_flow(workspace, prefect_harness):
    from pydantic import ValidationError

    from flows.export import export_flow
    from polite.config.export import ExportSettings

    assert ExportSettings().dedupe == "none"
    with pytest.raises(ValidationError, match="dedupe"):
        ExportSettings(dedupe="fuzzy")
    populate_with_duplicates(workspace)
    out = export_flow(config={"export": {"report": "none", "dedupe": "response"}}, workspace=workspace.root,
                      formats=["pf1m"])  # fmt: skip
    assert _items(out) == ["s_coco_0", "s_gqa_0"] and out["dedupe"] == "response"


def test_polite_export_prints_the_counts_and_warns_naming_the_setting(workspace, prefect_harness):
    from typer.testing import CliRunner

    from polite.cli import app

    populate_with_duplicates(workspace)
    run = lambda *args: CliRunner().invoke(app, ["export", "-w", workspace.root, "--format", "pf1m", *args])  # noqa: E731
    plain = run()
    assert plain.exit_code == 0, plain.output
    text = " ".join(plain.output.split())  # rich wraps long lines at the terminal width
    assert "duplicates: 1 exact, 3 repeating an earlier item's response (of 5 selected; export.dedupe: none, kept all)" in text
    assert "warning: 3 of 5 exported items (60%) repeat an earlier item's response" in text
    assert "--dedupe response" in text
    deduped = run("--dedupe", "response")
    assert deduped.exit_code == 0, deduped.output
    text = " ".join(deduped.output.split())
    assert "exported 2 items" in text and "export.dedupe: response, dropped 3" in text and "warning" not in text
    bad = run("--dedupe", "fuzzy")
    assert bad.exit_code == 2 and "fuzzy" in bad.output


# -- the SQL itself, on inline tables ---------------------------------------------------------------------


def _table(rows: list[tuple[str, list[str], str | None, str | None]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"sample_id": s, "image_paths": i, "instruction": q, "output": o, "extra": n} for n, (s, i, q, o) in enumerate(rows)]
    )


def test_duplicates_are_counted_after_whitespace_normalisation_and_the_first_by_sample_id_is_kept():
    from tasks.export_dedupe import drop_duplicates

    table = _table([
        ("s_5", ["a.png"], "Q", "A dog.\n\nOn a couch."),  # exact duplicate of s_1 (rows are not in id order)
        ("s_1", ["a.png"], "Q", "  A dog. On a  couch."),
        ("s_2", ["b.png"], "Q", "A dog.\tOn a couch."),  # same response, other image: a response repeat only
        ("s_3", ["a.png"], "Other Q", "A dog. On a couch."),  # other instruction: a response repeat only
        ("s_4", ["a.png", "b.png"], "Q", "a dog. on a couch."),  # case differs: another response
        ("s_6", [], None, "Fine."),
        ("s_7", [], None, "Fine. "),  # no image and no instruction either: exact
        ("s_8", ["b.png", "a.png"], "Q", "a dog. on a couch."),  # images in another order: not exact
    ])  # fmt: skip
    kept, found = drop_duplicates(table, "none")
    assert kept is table
    assert (found.selected, found.exact, found.response, found.dropped, found.exported_repeats) == (8, 2, 5, 0, 5)
    assert found.top[0] == ('"A dog. On a couch."', 4)
    exact, found = drop_duplicates(table, "exact")
    assert exact.column("sample_id").to_pylist() == ["s_1", "s_2", "s_3", "s_4", "s_6", "s_8"]
    assert exact.schema == table.schema and found.dropped == 2 and found.exported_repeats == 3
    response, found = drop_duplicates(table, "response")
    # the first of each group by sample_id, in the table's own row order
    assert response.column("sample_id").to_pylist() == ["s_1", "s_4", "s_6"] and found.exported_repeats == 0
    assert response.column("extra").to_pylist() == [1, 4, 5]  # whole rows, untouched


def test_the_warning_starts_above_a_tenth_of_the_exported_items():
    from tasks.export_dedupe import Duplicates, quote, repeat_warning

    found = lambda repeats, n=20: Duplicates("exact", n, 0, repeats, 0, n, repeats)  # noqa: E731
    assert repeat_warning(found(2)) is None and repeat_warning(found(0, 0)) is None
    assert repeat_warning(found(3)).startswith("3 of 20 exported items (15%) repeat an earlier item's response")
    assert "(export.dedupe: exact); set export.dedupe: response" in repeat_warning(found(3))
    assert quote("x" * 150) == '"' + "x" * 99 + '…"' and quote(None) == '""'


def test_the_recorded_sql_without_dedupe_is_the_selection_itself():
    from flows.export import selection_sql
    from lineage.store import check_read_only_sql
    from tasks.export_dedupe import deduped_selection_sql

    sql = selection_sql(None)
    assert deduped_selection_sql(sql, "none") is sql
    for mode in ("exact", "response"):
        wrapped = deduped_selection_sql(sql, mode)
        check_read_only_sql(wrapped)  # still one read-only SELECT
        assert wrapped.startswith("SELECT * FROM (\n" + sql.strip()) and "QUALIFY row_number()" in wrapped
    assert "image_paths, instruction" in deduped_selection_sql(sql, "exact")
    assert "image_paths" not in deduped_selection_sql(sql, "response").split("QUALIFY")[1]


def test_a_held_export_says_dedupe_left_it_short(workspace, prefect_harness):
    """`min_items` counts the items left to export: after dedupe, the line says how many it dropped of how many."""
    from flows.export import ExportCheckFailed, export_flow

    populate_with_duplicates(workspace)
    config = {"export": {"report": "none", "checks": {"min_items": 3}}}
    with pytest.raises(ExportCheckFailed, match=r"min_items: 2 items to export, need at least 3 "
                                                r"\(after export.dedupe: response dropped 3 of 5 selected\)"):  # fmt: skip
        export_flow(config=config, workspace=workspace.root, formats=["pf1m"], dedupe="response")


def test_the_report_of_a_deduped_export_counts_and_shows_its_items(workspace, prefect_harness):
    """The report is written for this export: its funnel's `exported` is the items left after dedupe, and a
    kept sample card is one of those items (not one the dedupe dropped)."""
    from flows.export import export_flow

    populate_with_duplicates(workspace)
    out = export_flow(config={"export": {"report": "markdown", "sample_cards": 10}}, workspace=workspace.root,
                      formats=["pf1m"], dedupe="response")  # fmt: skip
    text = Path(out["report"]).read_text()
    assert f"| exported | {out['n_items']} | in this export |" in text, text
    exported = set(_items(out))
    shown_kept = {line.split()[1] for line in text.splitlines() if line.startswith("### ") and "; kept)" in line}
    assert shown_kept and shown_kept <= exported, (shown_kept, exported)
