"""Export: write one selection shard (kept rewrites + scores + image paths) in one published format.

Formats:
- ``datasets``: ``Dataset.save_to_disk`` with an ``images`` column of the ``Image`` feature (bytes embedded);
- ``parquet``: the same table as ``data/train-00000-of-00001.parquet`` (what the Hub's viewer reads);
- ``pf1m``: the PF-1M JSON layout, one JSON array per source, fields as published (input, output, original,
  reward, rouge_score, nli_similarity, sts_similarity, filtered_paragraphs, paragraph_clip_scores; null where
  a scorer did not run) plus ``id``, ``source``, ``task_type`` and ``images``;
- ``llava``: LLaVA conversation JSON (``id``, ``image``, ``conversations`` of human/gpt turns).
JSON layouts reference images under ``images/`` in the export folder (hard-linked or copied).

The output folder is derived from the export id, and ``_SUCCESS.json`` is written last: a repeated task
finds it and does nothing, so exporting the same selection twice gives the same files. The dataset card
(``README.md`` of every export folder) is built here too, from facts read in the lineage.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
from fsspec.core import url_to_fs
from prefect import task

from lineage.store import LineageStore
from polite.record import CHUNK_END, IMAGE_MARKER
from polite.shards import read_table, write_bytes_atomic
from tasks.report import funnel, md_table

SUCCESS = "_SUCCESS.json"
PF1M_FIELDS = (
    "input",
    "output",
    "original",
    "reward",
    "rouge_score",
    "nli_similarity",
    "sts_similarity",
    "filtered_paragraphs",
    "paragraph_clip_scores",
)


def _join(folder: str, *parts: str) -> str:
    return "/".join([folder.rstrip("/"), *parts])


def _image_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _details(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _filtered_paragraphs(row: dict[str, Any]) -> list[str] | None:
    """Paragraphs of the rewrite that CLIPScore removed (absent from the final output); null without CLIPScore."""
    if row.get("clipscore") is None:
        return None
    from filters.clipscore import split_paragraphs

    kept = set(split_paragraphs(row.get("output") or ""))
    return [p for p in split_paragraphs(row.get("rewrite") or "") if p not in kept]


def pf1m_record(row: dict[str, Any]) -> dict[str, Any]:
    """One selected row in the PF-1M layout; scores a scorer did not produce stay null."""
    clip = _details(row.get("clip_details"))
    return {
        "id": row["sample_id"],
        "source": row["source"],
        "task_type": row["task_type"],
        "images": [f"images/{_image_name(p)}" for p in row.get("image_paths") or []],
        "input": row["instruction"],
        "output": row["output"],
        "original": row["raw_response"],
        "reward": row.get("reward"),
        "rouge_score": row.get("rouge"),
        "nli_similarity": row.get("nli"),
        "sts_similarity": row.get("semantic"),
        "filtered_paragraphs": _filtered_paragraphs(row),
        "paragraph_clip_scores": clip.get("paragraph_scores") if row.get("clipscore") is not None else None,
    }


def llava_record(row: dict[str, Any]) -> dict[str, Any]:
    """One selected row as a LLaVA conversation; Flamingo's chunk markers are dropped, ``<image>`` kept."""
    images = [f"images/{_image_name(p)}" for p in row.get("image_paths") or []]
    human = (row["instruction"] or "").replace(CHUNK_END, "").strip()
    if images and IMAGE_MARKER not in human:
        human = IMAGE_MARKER + "\n" + human
    record: dict[str, Any] = {"id": row["sample_id"]}
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["image"] = images
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": row["output"]}]
    return record


def place_images(rows: list[dict[str, Any]], out_dir: str, mode: str) -> int:
    """Hard-link (or copy) every distinct image of ``rows`` into ``out_dir/images``; returns how many."""
    if mode == "none":
        return 0
    paths = sorted({p for r in rows for p in (r.get("image_paths") or [])})
    fs_out, local_out = url_to_fs(_join(out_dir, "images"))
    fs_out.makedirs(local_out, exist_ok=True)
    for src in paths:
        dst = _join(out_dir, "images", _image_name(src))
        fs_dst, dst_path = url_to_fs(dst)
        if fs_dst.exists(dst_path):
            continue
        fs_src, src_path = url_to_fs(src)
        both_local = fs_src.protocol in ("file", ("file", "local")) and fs_dst.protocol in (
            "file",
            ("file", "local"),
        )
        if mode == "link" and both_local:
            try:
                os.link(src_path, dst_path)
                continue
            except OSError:  # another device, or a filesystem without hard links
                pass
        if both_local:
            shutil.copyfile(src_path, dst_path)
        else:
            with fs_src.open(src_path, "rb") as handle:
                write_bytes_atomic(handle.read(), dst)
    return len(paths)


def _write_json(data: Any, url: str) -> None:
    write_bytes_atomic(json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"), url)


def _hf_table(rows: list[dict[str, Any]]):
    """The selection as a `datasets.Dataset` with embedded image bytes (Image feature)."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "task_type": datasets.Value("string"),
            "images": datasets.Sequence(datasets.Image()),
            **{f: datasets.Value("string") for f in ("input", "output", "original")},
            **{
                f: datasets.Value("float64")
                for f in ("reward", "rouge_score", "nli_similarity", "sts_similarity")
            },
            "filtered_paragraphs": datasets.Sequence(datasets.Value("string")),
            "paragraph_clip_scores": datasets.Sequence(datasets.Value("float64")),
            "rewrite_id": datasets.Value("string"),
        }
    )
    records = []
    for row in rows:
        rec = pf1m_record(row)
        images = []
        for path in row.get("image_paths") or []:
            fs, local = url_to_fs(path)
            with fs.open(local, "rb") as handle:
                images.append({"bytes": handle.read(), "path": _image_name(path)})
        rec["images"] = images
        scores = rec["paragraph_clip_scores"]
        rec["paragraph_clip_scores"] = None if scores is None else [float(s) for s in scores]
        rec["rewrite_id"] = row["rewrite_id"]
        records.append(rec)
    if not records:  # from_list cannot take its columns from no rows
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_list(records, features=features)


def write_export(
    selection_url: str, fmt: str, out_dir: str, images: str = "link", card: str | None = None
) -> dict:
    """Write the rows of ``selection_url`` to ``out_dir`` in format ``fmt``; a no-op when already done.

    Returns the manifest: format, folder, files (relative) and item count.
    """
    done = _join(out_dir, SUCCESS)
    fs, done_path = url_to_fs(done)
    if fs.exists(done_path):
        with fs.open(done_path, "rb") as handle:
            # the folder it is in now: a copied or moved workspace finds its exports done where they are
            return {**json.loads(handle.read()), "path": out_dir}
    rows = read_table(selection_url).to_pylist()
    rows.sort(key=lambda r: r["sample_id"])
    files: list[str] = []
    if fmt == "pf1m":
        by_source: dict[str, list[dict]] = {}
        for row in rows:
            by_source.setdefault(row["source"], []).append(pf1m_record(row))
        for source, records in sorted(by_source.items()):
            name = f"{source}.json"
            _write_json(records, _join(out_dir, name))
            files.append(name)
        place_images(rows, out_dir, images)
    elif fmt == "llava":
        _write_json([llava_record(r) for r in rows], _join(out_dir, "llava.json"))
        files.append("llava.json")
        place_images(rows, out_dir, images)
    elif fmt == "datasets":
        fs.makedirs(url_to_fs(out_dir)[1], exist_ok=True)
        # An empty table saved as 0 shards cannot be loaded back (datasets' load_from_disk needs one file).
        _hf_table(rows).save_to_disk(out_dir, num_shards=1 if not rows else None)
        files.append("dataset_info.json")
    elif fmt == "parquet":
        name = "data/train-00000-of-00001.parquet"
        fs.makedirs(url_to_fs(_join(out_dir, "data"))[1], exist_ok=True)
        _hf_table(rows).to_parquet(_join(out_dir, name))
        files.append(name)
    else:
        raise ValueError(f"unknown export format {fmt!r}; use one of datasets, parquet, pf1m, llava")
    if card is not None:
        write_bytes_atomic(card.encode("utf-8"), _join(out_dir, "README.md"))
        files.append("README.md")
    manifest = {"format": fmt, "path": out_dir, "files": files, "n_items": len(rows)}
    write_bytes_atomic(json.dumps(manifest, sort_keys=True).encode("utf-8"), done)
    return manifest


@task(name="write-export", retries=1, retry_delay_seconds=2)
def write_export_task(job: dict, selection_url: str, images: str = "link", card: str | None = None) -> dict:
    """One format of one export: ``job`` holds ``format`` and ``out_dir``."""
    return write_export(selection_url, job["format"], job["out_dir"], images, card)


def push_folder_to_hub(folder: str, repo_id: str, private: bool = True, api: Any = None) -> str:
    """Upload an export folder (with its README.md dataset card) to a Hub dataset repo; returns its URL.

    ``api`` is a ``huggingface_hub.HfApi`` (the default) or anything with the same two methods.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    local = Path(url_to_fs(folder)[1])
    api.create_repo(repo_id=repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(local),
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Polite Flamingo export",
        ignore_patterns=[SUCCESS, ".tmp-*"],
    )
    return f"https://huggingface.co/datasets/{repo_id}"


# -- the dataset card (README.md of every export folder; what the Hub shows) ---------------------------


def card_facts(store: LineageStore, sql: str, selection: pa.Table) -> dict[str, Any]:
    """What a dataset card states, read from the lineage for the selected rewrites."""
    with store.reader() as con:
        con.register("selection", selection.select(["sample_id", "rewrite_id", "model_id", "source"]))
        sources = (
            con.sql("SELECT source, count(*) AS n FROM selection GROUP BY source ORDER BY source")
            .to_arrow_table()
            .to_pylist()
        )
        thresholds = con.execute(
            "SELECT d.thresholds, count(*) AS n FROM selection s JOIN latest_decisions d USING (rewrite_id) "
            "GROUP BY d.thresholds ORDER BY n DESC"
        ).fetchall()
        models = (
            con.sql(
                "SELECT s.model_id, coalesce(m.kind, 'rewriter') AS kind, m.base, m.adapter, count(*) AS n "
                "FROM selection s LEFT JOIN models m USING (model_id) "
                "GROUP BY s.model_id, m.kind, m.base, m.adapter ORDER BY s.model_id"
            )
            .to_arrow_table()
            .to_pylist()
        )
        settings = con.execute(
            "SELECT r.settings, r.prompt_version, count(*) AS n FROM selection s JOIN rewrites r USING (rewrite_id) "
            "GROUP BY r.settings, r.prompt_version ORDER BY n DESC"
        ).fetchall()
        con.unregister("selection")
    return {
        "n_items": selection.num_rows,
        "sources": sources,
        "funnel": funnel(store),
        "thresholds": [(t, n) for t, n in thresholds],
        "models": models,
        "settings": [(s, p, n) for s, p, n in settings],
        "selection": sql.strip(),
    }


def dataset_card(facts: dict[str, Any], settings: Any = None) -> str:
    """A Hub dataset card (YAML header + Markdown) from :func:`card_facts`."""
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*.parquet",
        "task_categories:",
        "- visual-question-answering",
        "- image-to-text",
        "language:",
        "- en",
        "tags:",
        "- polite-flamingo",
        "- synthetic",
        "---",
        "",
        "# Polite Flamingo rewrites",
        "",
        f"{facts['n_items']:,} raw vision-language annotations rewritten into helpful, well-formed responses by a "
        "multimodal rewriter (Polite Flamingo, arXiv 2307.01003) and kept by its filter chain.",
        "",
        "## Sources",
        "",
        md_table(facts["sources"]),
        "## Counts (funnel)",
        "",
        md_table([s for s in facts["funnel"] if s["step"] != "exported"]),
        "## Filters and thresholds",
        "",
    ]
    if facts["thresholds"]:
        for text, n in facts["thresholds"]:
            lines.append(f"- {n:,} items decided with: `{text}`")
    else:
        lines.append("- (no thresholds recorded)")
    lines += ["", "## Models and settings", ""]
    for model in facts["models"]:
        lines.append(
            f"- {model['n']:,} items rewritten by `{model['model_id']}` ({model['kind']}): "
            f"base `{model['base']}`, adapter `{model['adapter']}`"
        )
    counts = Counter()
    for text, prompt, n in facts["settings"]:
        counts[(text, prompt)] += n
    for (text, prompt), n in counts.most_common():
        lines.append(f"- {n:,} rewrites with prompt `{prompt}` and generation settings `{text}`")
    if settings is not None:
        checks = json.dumps(settings.checks.model_dump(), sort_keys=True)
        lines.append(f"- export checks: `{checks}`")
    lines += [
        "",
        "## Lineage query that selected this export",
        "",
        "```sql",
        facts["selection"],
        "```",
        "",
        "Every item carries its `id` (sample_id) and `rewrite_id`; `polite explain <sample_id>` in the factory's "
        "workspace shows its source row, distortions, rewrite attempts, scores and decision.",
        "",
    ]
    return "\n".join(lines)
