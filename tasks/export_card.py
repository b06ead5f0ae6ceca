"""The dataset card: ``README.md`` of every export folder, and what the Hub shows for a pushed one.

Two steps: :func:`card_facts` reads what the card states from the lineage (this export's items per source and
split, the workspace's funnel, thresholds, models, generation settings), and :func:`dataset_card` renders those
facts as YAML front matter + Markdown for one format. The writers only place the rendered text in the folder.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from lineage.store import LineageStore
from tasks.export_dedupe import Duplicates
from tasks.report import funnel, md_table


def card_facts(
    store: LineageStore, sql: str, selection: pa.Table, duplicates: Duplicates | None = None
) -> dict[str, Any]:
    """What a dataset card states, read from the lineage for the selected rewrites (and the export's duplicate
    counts, from tasks/export_dedupe.py)."""
    with store.reader() as con:
        con.register("selection", selection.select(["sample_id", "rewrite_id", "model_id", "source", "split", "kept"]))
        rows = lambda sql: con.sql(sql).to_arrow_table().to_pylist()  # noqa: E731
        sources = rows("SELECT source, split, count(*) AS n FROM selection GROUP BY ALL ORDER BY source, split")
        (not_kept,) = con.execute("SELECT count(*) FROM selection WHERE kept IS NOT TRUE").fetchone()
        thresholds = con.execute(
            "SELECT d.thresholds, count(*) AS n FROM selection s JOIN latest_decisions d USING (rewrite_id) "
            "GROUP BY d.thresholds ORDER BY n DESC"
        ).fetchall()
        models = rows(
            "SELECT s.model_id, coalesce(m.kind, 'rewriter') AS kind, m.base, m.adapter, count(*) AS n "
            "FROM selection s LEFT JOIN models m USING (model_id) "
            "GROUP BY s.model_id, m.kind, m.base, m.adapter ORDER BY s.model_id"
        )
        settings = con.execute(
            "SELECT r.settings, r.prompt_version, count(*) AS n FROM selection s JOIN rewrites r USING (rewrite_id) "
            "GROUP BY r.settings, r.prompt_version ORDER BY n DESC"
        ).fetchall()
        con.unregister("selection")
    return {
        "n_items": selection.num_rows,
        "n_not_kept": not_kept,
        "sources": sources,
        "funnel": funnel(store, selection.num_rows),
        "thresholds": [(t, n) for t, n in thresholds],
        "models": models,
        "settings": [(s, p, n) for s, p, n in settings],
        "selection": sql.strip(),
        "duplicates": None if duplicates is None else duplicates.as_dict(),
    }


_HEADER = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
"""
_TAGS = """task_categories:
- visual-question-answering
- image-to-text
language:
- en
tags:
- polite-flamingo
- synthetic
---
"""
# what each format holds to find an item in the factory's lineage
_IDS = {
    "datasets": "its `id` (sample_id) and `rewrite_id`",
    "parquet": "its `id` (sample_id) and `rewrite_id`",
    "pf1m": "its `id` (sample_id)",
    "llava": "its `id` (sample_id)",
}
EVAL_SPLITS = ("validation", "val", "test", "testdev", "test-dev", "minival")


def _model_line(model: dict[str, Any]) -> str:
    adapter = f", adapter `{model['adapter']}`" if model.get("adapter") else ", no adapter"
    base = f"base `{model['base']}`" if model.get("base") else "base not recorded"
    return f"- {model['n']:,} items rewritten by `{model['model_id']}` ({model['kind']}): {base}{adapter}"


def _intro(facts: dict[str, Any]) -> list[str]:
    n, not_kept = facts["n_items"], facts.get("n_not_kept", 0)
    lines = [
        f"{n:,} raw vision-language annotations rewritten into helpful, well-formed responses by a multimodal "
        "rewriter (Polite Flamingo, arXiv 2307.01003)"
        + (" and kept by its filter chain." if not not_kept else
           f"; **{not_kept:,} of them were not kept by its filter chain** (the selection below asks for them)."),
        "",
    ]  # fmt: skip
    evals = sum(s["n"] for s in facts["sources"] if (s.get("split") or "").lower() in EVAL_SPLITS)
    if evals:
        lines += [f"**{evals:,} items come from evaluation splits** of their sources (the `split` field): "
                  "leave them out before training a model you evaluate on those benchmarks.", ""]  # fmt: skip
    return lines


def _duplicate_lines(found: dict[str, Any]) -> list[str]:
    """The card's duplicates section: what the selection held, and what ``export.dedupe`` did with it."""
    selected, setting = found["selected"], f"`export.dedupe: {found['dedupe']}`"
    lines = ["## Duplicates", "",
             f"Of the {selected:,} selected items, in sample_id order (responses compared after whitespace "
             "normalisation):",
             f"- {found['exact']:,} are exact duplicates of an earlier item: the same images, instruction and response;",
             f"- {found['response']:,} repeat an earlier item's response, whatever their images and instruction "
             f"({selected - found['response']:,} distinct responses).", ""]  # fmt: skip
    if found["dedupe"] == "none":
        lines.append(f"{setting}: every one is in this export (`exact` or `response` keeps only the first item of "
                     "each group).")  # fmt: skip
    else:
        lines.append(f"{setting} dropped {found['dropped']:,} of them, keeping the first item of each group: "
                     f"{found['exported_repeats']:,} items of this export repeat an earlier one's response.")  # fmt: skip
    if found["top"]:
        lines += ["", "Most repeated responses (items that share each):", "",
                  *(f"- {n:,}: {text}" for text, n in found["top"])]  # fmt: skip
    return [*lines, ""]


def dataset_card(
    facts: dict[str, Any], settings: Any = None, fmt: str = "parquet", check_notes: dict[str, str] | None = None
) -> str:
    """A Hub dataset card (YAML header + Markdown) for one format's folder, from :func:`card_facts`.

    ``check_notes``: each export check's outcome (passed, off, or why it was skipped), from the flow.
    """
    lines = [(_HEADER if fmt == "parquet" else "---\n") + _TAGS, "# Polite Flamingo rewrites", "", *_intro(facts)]
    lines += ["## Items of this export (source, split)", "", md_table(facts["sources"])]
    if facts.get("duplicates"):
        lines += _duplicate_lines(facts["duplicates"])
    lines += ["## Factory funnel (the whole workspace at export time, not only this export)", "",
              md_table([s for s in facts["funnel"] if s["step"] != "exported"]),
              "## Filters and thresholds", ""]  # fmt: skip
    if facts["thresholds"]:
        lines += [f"- {n:,} items decided with: `{text}`" for text, n in facts["thresholds"]]
    else:
        lines.append("- (no thresholds recorded)")
    lines += ["", "## Models and settings", "", *(_model_line(m) for m in facts["models"])]
    counts: Counter = Counter()
    for text, prompt, n in facts["settings"]:
        counts[(text, prompt)] += n
    for (text, prompt), n in counts.most_common():
        lines.append(f"- {n:,} rewrites with prompt `{prompt}` and generation settings `{text}`")
    if check_notes:
        lines += ["", "## Export checks", "", *(f"- `{name}`: {note}" for name, note in check_notes.items())]
    lines += ["", "## Lineage query that selected this export", "", "```sql", facts["selection"], "```", "",
              f"Every item carries {_IDS.get(fmt, _IDS['pf1m'])} and its source `split`; `polite explain "
              "<sample_id>` in the factory's workspace shows its source row, distortions, rewrite attempts, scores "
              "and decision.", ""]  # fmt: skip
    if settings is not None and fmt in ("pf1m", "llava") and settings.images == "none":
        lines += ["Images are not in this folder (`export.images: none`): the `images` paths are relative to "
                  "the factory workspace's root (its image store), not to this folder.", ""]  # fmt: skip
    return "\n".join(lines)
