"""The dataset card as its own module: facts from the lineage, rendered as Markdown, with nothing left behind in
(or re-exported by) the format writers."""

from __future__ import annotations

from test_export_flow import populate


def _facts(**extra) -> dict:
    return {
        "n_items": 3,
        "n_not_kept": 0,
        "sources": [{"source": "gqa", "split": "train", "n": 2}, {"source": "gqa", "split": "testdev", "n": 1}],
        "funnel": [{"step": "ingested", "count": 9, "note": ""}, {"step": "exported", "count": 3, "note": ""}],
        "thresholds": [('{"semantic": 0.4}', 3)],
        "models": [{"model_id": "m_tiny", "kind": "rewriter", "base": None, "adapter": None, "n": 3}],
        "settings": [('{"num_beams": 1}', "v1", 3)],
        "selection": "SELECT 1",
        **extra,
    }


def test_the_card_lives_in_its_own_module_and_the_writers_do_not_carry_it():
    import tasks.export as texport
    import tasks.export_card as card

    for name in ("card_facts", "dataset_card", "EVAL_SPLITS", "_intro", "_model_line", "_HEADER", "_TAGS", "_IDS"):
        assert hasattr(card, name) and not hasattr(texport, name), name


def test_the_card_renders_its_facts_and_the_duplicates_only_when_counted():
    from tasks.export_card import dataset_card

    plain = dataset_card(_facts(), fmt="pf1m")
    assert plain.startswith("---\ntask_categories:") and "data_files" not in plain
    assert "**1 items come from evaluation splits**" in plain and "| gqa | testdev | 1 |" in plain
    assert "| exported |" not in plain and "- 3 items decided with: `{\"semantic\": 0.4}`" in plain
    assert "## Duplicates" not in plain  # facts of before duplicates were counted render as they did
    found = {"dedupe": "response", "selected": 5, "exact": 1, "response": 3, "dropped": 3, "exported": 2,
             "exported_repeats": 0, "top": [('"The object is red."', 2)]}  # fmt: skip
    card = dataset_card(_facts(duplicates=found), fmt="parquet")
    assert card.startswith("---\nconfigs:") and "path: data/train-*.parquet" in card
    section = card.split("## Duplicates")[1].split("## Factory funnel")[0]
    assert "- 1 are exact duplicates of an earlier item" in section and "(2 distinct responses)" in section
    assert "`export.dedupe: response` dropped 3 of them, keeping the first item of each group: 0 items" in section
    assert '- 2: "The object is red."' in section


def test_card_facts_read_the_selected_items_from_the_lineage(workspace):
    from flows.export import select, selection_sql
    from tasks.export_card import card_facts
    from tasks.export_dedupe import drop_duplicates

    store = populate(workspace)
    selection, found = drop_duplicates(select(store, selection_sql(None)), "exact")
    facts = card_facts(store, selection_sql(None), selection, found)
    assert facts["n_items"] == 4 and facts["n_not_kept"] == 0  # coco_3 exactly duplicates coco_0
    assert facts["sources"] == [{"source": "coco", "split": "train", "n": 2}, {"source": "gqa", "split": "train", "n": 2}]
    assert facts["duplicates"]["dropped"] == 1 and facts["duplicates"]["dedupe"] == "exact"
    assert [m["model_id"] for m in facts["models"]] == ["m_tiny"] and facts["selection"].startswith("WITH picked")
    assert card_facts(store, "SELECT 1", selection)["duplicates"] is None
