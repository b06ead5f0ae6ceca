"""Export: write one selection shard (kept rewrites + scores + image paths) in one published format.

Formats:
- ``datasets``: ``Dataset.save_to_disk`` with an ``images`` column of the ``Image`` feature (bytes embedded);
- ``parquet``: the same table as ``data/train-0000i-of-0000n.parquet`` shards of about ``SHARD_BYTES`` of
  images each (what the Hub's viewer reads; the Hub refuses files over 50 GB);
- ``pf1m``: the PF-1M JSON layout, one JSON array per source, fields as published (input, output, original,
  reward, rouge_score, nli_similarity, sts_similarity, filtered_paragraphs, paragraph_clip_scores; null where
  a scorer did not run) plus ``id``, ``source``, ``split``, ``task_type`` and ``images``;
- ``llava``: LLaVA conversation JSON (``id``, ``split``, ``image``, ``conversations`` of human/gpt turns).
JSON layouts reference images under ``images/`` in the export folder (hard-linked or copied).

Every format reads the selection a batch of rows at a time and writes as it goes: ``datasets`` and ``parquet``
with the batch's image bytes, the JSON layouts appending records to their arrays (``JsonArrayFile``, the same
bytes as one ``json.dumps`` of every record), so no format holds every image, or every text, at once.
A format is written into a temporary sibling folder that is renamed into place once complete, with
``_SUCCESS.json`` written last: a crash leaves no half-written export, and a repeated task finds the folder
done and only rewrites its dataset card (``README.md``, rendered by ``tasks/export_card.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from tempfile import mkdtemp
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from prefect import task

from polite.record import CHUNK_END, IMAGE_MARKER
from polite.shards import write_bytes_atomic
from polite.workspace import is_local

SUCCESS = "_SUCCESS.json"
# Bumped whenever a format's files change for the same selection (fields, names, manifest): it is part of the
# export id, so a folder written by an older layout is never taken for a finished one.
LAYOUT_VERSION = 2
# Image bytes per parquet file: a few hundred MB keeps every file far below the Hub's 50 GB limit and its
# viewer responsive, and bounds what one writer holds.
SHARD_BYTES = 500 * 1024 * 1024
# Rows read from the selection at a time by the image-embedding formats (one parquet row group each).
BATCH_ROWS = 256
# Rows read at a time by the JSON layouts: text only (a few KB a row), so a batch is a few MB of Python objects.
JSON_BATCH_ROWS = 1024
# Formats that read the image files (the JSON layouts read them only to link or copy them).
EMBEDS_IMAGES = ("datasets", "parquet")
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


def reads_images(fmt: str, images: str) -> bool:
    """Whether writing ``fmt`` opens the image files (so a missing one would stop it half-way)."""
    return fmt in EMBEDS_IMAGES or images != "none"


def _join(folder: str, *parts: str) -> str:
    return "/".join([folder.rstrip("/"), *parts])


def _image_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _image_refs(row: dict[str, Any]) -> list[str]:
    """The paths a JSON record names: ``images/<file>`` in the export folder, or (``images: none``, when the
    writer sets ``image_refs``) the image store's paths relative to the workspace root."""
    if row.get("image_refs") is not None:
        return list(row["image_refs"])
    return [f"images/{_image_name(p)}" for p in row.get("image_paths") or []]


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
        # the source's split: an item of an eval split (validation, test) must not be trained on by whoever
        # evaluates on that benchmark
        "split": row.get("split"),
        "task_type": row["task_type"],
        "images": _image_refs(row),
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


def image_marker_mismatch(instruction: str | None, n_images: int) -> str | None:
    """Why an instruction's ``<image>`` markers cannot be paired with its images (None: they can).

    No marker at all is fine (LLaVA's layout puts them in front); any other count must be the image count,
    or the n-th marker would point at another image, or at none.
    """
    n_markers = (instruction or "").count(IMAGE_MARKER)
    if n_markers and n_markers != n_images:
        return f"{n_markers} {IMAGE_MARKER} marker(s) for {n_images} image(s)"
    return None


def llava_human_turn(instruction: str | None, n_images: int) -> str:
    """The instruction as LLaVA's human turn: one ``<image>\\n`` per image, chunk breaks as newlines."""
    text = (instruction or "").replace(CHUNK_END, "\n")
    if IMAGE_MARKER not in text:
        text = IMAGE_MARKER * n_images + text
    # LLaVA's own data writes "<image>\n" before the text each image goes with
    text = re.sub(re.escape(IMAGE_MARKER) + r"\s*", IMAGE_MARKER + "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def llava_record(row: dict[str, Any]) -> dict[str, Any]:
    """One selected row as a LLaVA conversation. Raises ValueError when its markers and images disagree
    (the export checks this for the whole selection before writing anything)."""
    images = _image_refs(row)
    mismatch = image_marker_mismatch(row["instruction"], len(images))
    if mismatch:
        raise ValueError(f"{row['sample_id']}: {mismatch}")
    record: dict[str, Any] = {"id": row["sample_id"], "split": row.get("split")}
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["image"] = images
    human = llava_human_turn(row["instruction"], len(images))
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": row["output"]}]
    return record


def place_images(rows: list[dict[str, Any]], out_dir: str, mode: str) -> int:
    """Hard-link (or copy) every distinct image of ``rows`` into ``out_dir/images``; returns how many. An image
    already there (placed for an earlier batch) is left as it is."""
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


def missing_image_files(selection: pa.Table) -> list[tuple[str, list[str]]]:
    """(sample_id, [missing file, ...]) for every row whose ``image_paths`` (located) are not on disk.

    One stat per distinct image: cheap next to reading them, and it lets the export stop before writing.
    """
    missing: dict[str, bool] = {}
    found = []
    for row in selection.select(["sample_id", "image_paths"]).to_pylist():
        gone = []
        for path in row["image_paths"] or []:
            if path not in missing:
                fs, local = url_to_fs(path)
                missing[path] = not fs.exists(local)
            if missing[path]:
                gone.append(path)
        if gone:
            found.append((row["sample_id"], gone))
    return found


class JsonArrayFile:
    """A JSON array written to ``url`` a batch of records at a time, byte for byte what
    ``json.dumps(records, ensure_ascii=False, indent=1)`` gives for all of them at once (the layout the JSON
    formats have always had), so no writer needs every record in memory.

    Written in place: the file is inside the format's temporary folder, which is what makes the export atomic.
    """

    def __init__(self, url: str) -> None:
        fs, path = url_to_fs(url)
        self._handle = fs.open(path, "wb")
        self.n = 0

    def extend(self, records: list[dict[str, Any]]) -> None:
        # json.dumps escapes newlines inside strings, so each "\n" of a record is a line break of the layout:
        # one more space after it nests the record one level (indent=1) inside the array
        for record in records:  # one record's text at a time (the handle buffers the small writes)
            text = json.dumps(record, ensure_ascii=False, indent=1).replace("\n", "\n ")
            self._handle.write((("[\n " if self.n == 0 else ",\n ") + text).encode("utf-8"))
            self.n += 1

    def close(self) -> None:
        """End the array (``[]`` when empty, as json.dumps writes it) and close the file."""
        if self._handle.closed:
            return
        try:
            self._handle.write(b"\n]" if self.n else b"[]")
        finally:  # a failed last write (a full disk) still lets the file go
            self._handle.close()


def hf_features():
    """The `datasets` features of the ``datasets`` and ``parquet`` formats."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "split": datasets.Value("string"),
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


def _read_image(path: str) -> dict[str, Any]:
    fs, local = url_to_fs(path)
    with fs.open(local, "rb") as handle:
        return {"bytes": handle.read(), "path": _image_name(path)}


def hf_record(row: dict[str, Any]) -> dict[str, Any]:
    """One selected row with its images' bytes, as the `datasets` features above take it."""
    rec = pf1m_record(row)
    rec["images"] = [_read_image(p) for p in row.get("image_paths") or []]
    scores = rec["paragraph_clip_scores"]
    rec["paragraph_clip_scores"] = None if scores is None else [float(s) for s in scores]
    rec["rewrite_id"] = row["rewrite_id"]
    return rec


def selection_batches(selection_url: str, rows: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """The selection's rows, ``rows`` (default BATCH_ROWS) at a time, in sample_id order (as the flow wrote it)."""
    fs, path = url_to_fs(selection_url)
    with fs.open(path, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=rows or BATCH_ROWS):
            yield batch.to_pylist()


def selection_rows(selection_url: str) -> int:
    fs, path = url_to_fs(selection_url)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def hf_examples(selection_url: str) -> Iterator[dict[str, Any]]:
    """Every selected row with its image bytes, one at a time (a generator for ``Dataset.from_generator``)."""
    for batch in selection_batches(selection_url):
        yield from (hf_record(row) for row in batch)


def write_parquet_shards(selection_url: str, out_dir: str, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """``data/train-0000i-of-0000n.parquet`` files of about ``shard_bytes`` of images each; returns the names.

    Batches are encoded by the features (their schema carries the Image feature in its metadata, so
    ``load_dataset("parquet")`` decodes images) and appended as row groups: one batch in memory at a time.
    """
    features = hf_features()
    schema = features.arrow_schema
    fs, local = url_to_fs(_join(out_dir, "data"))
    fs.makedirs(local, exist_ok=True)
    parts: list[str] = []
    writer, size = None, 0
    try:
        for batch in selection_batches(selection_url):
            records = [hf_record(row) for row in batch]
            table = pa.Table.from_pylist([features.encode_example(r) for r in records], schema=schema)
            if writer is None:
                parts.append(_join(out_dir, "data", f".part-{len(parts):05d}.parquet"))
                writer = pq.ParquetWriter(url_to_fs(parts[-1])[1], schema, filesystem=fs, compression="zstd")
                size = 0
            writer.write_table(table)
            size += sum(len(i["bytes"]) for r in records for i in r["images"])
            if size >= shard_bytes:
                writer.close()
                writer = None
    finally:  # closed on an error too: a writer closed later (on remote storage) could upload a stray part
        if writer is not None:
            writer.close()
    if not parts:  # an empty selection still gives one (empty) file, so the folder loads
        parts.append(_join(out_dir, "data", ".part-00000.parquet"))
        pq.write_table(schema.empty_table(), url_to_fs(parts[-1])[1], filesystem=fs)
    names = [f"data/train-{i:05d}-of-{len(parts):05d}.parquet" for i in range(len(parts))]
    for part, name in zip(parts, names, strict=True):  # the count is known only now
        fs.mv(url_to_fs(part)[1], url_to_fs(_join(out_dir, name))[1])
    return names


def write_datasets(selection_url: str, out_dir: str) -> None:
    """``Dataset.save_to_disk`` built by ``Dataset.from_generator``: datasets writes the rows to an Arrow
    cache as they come (inside the temporary folder, not ~/.cache), then saves it in shards."""
    import datasets

    features = hf_features()
    # the Arrow cache is local (memory-mapped): inside the temporary folder, or a temp dir for remote storage
    fs, local = url_to_fs(_join(out_dir, ".cache")) if is_local(out_dir) else (LocalFileSystem(), mkdtemp())
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:  # the flow shows its own progress: datasets' bars would only fill Prefect's logs
        datasets.disable_progress_bars()
    try:
        if not selection_rows(selection_url):  # from_generator needs a row
            ds = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        else:
            ds = datasets.Dataset.from_generator(
                hf_examples, features=features, cache_dir=local, gen_kwargs={"selection_url": selection_url}
            )
        # An empty table saved as 0 shards cannot be loaded back (datasets' load_from_disk needs one file).
        ds.save_to_disk(out_dir, num_shards=1 if not ds.num_rows else None)
        del ds
    finally:
        if quiet:
            datasets.enable_progress_bars()
        if fs.exists(local):
            fs.rm(local, recursive=True)


def _write_format(selection_url: str, fmt: str, out_dir: str, images: str, shard_bytes: int) -> dict[str, Any]:
    """The format's files in ``out_dir``; returns the manifest's ``files`` (relative) and ``n_items``."""
    if fmt in EMBEDS_IMAGES:
        n_items = selection_rows(selection_url)
        if fmt == "parquet":
            return {"files": write_parquet_shards(selection_url, out_dir, shard_bytes), "n_items": n_items}
        write_datasets(selection_url, out_dir)
        fs, local = url_to_fs(out_dir)
        return {"files": sorted(p.rsplit("/", 1)[-1] for p in fs.ls(local, detail=False)), "n_items": n_items}
    if fmt not in ("pf1m", "llava"):
        raise ValueError(f"unknown export format {fmt!r}; use one of datasets, parquet, pf1m, llava")
    return write_json_layout(selection_url, fmt, out_dir, images)


def write_json_layout(selection_url: str, fmt: str, out_dir: str, images: str) -> dict[str, Any]:
    """``pf1m`` (one array per source, ``<source>.json``) or ``llava`` (``llava.json``), and the images they
    name, written ``JSON_BATCH_ROWS`` rows at a time; returns the manifest's ``files`` and ``n_items``.

    Rows come in sample_id order, so each array holds its records in that order, as when the whole selection
    was read at once: the files are the same bytes, only the memory no longer grows with the selection.
    """
    arrays: dict[str, JsonArrayFile] = {}
    n_items, placed_images = 0, False
    try:
        if fmt == "llava":  # one file even for an empty selection (an empty array)
            arrays["llava"] = JsonArrayFile(_join(out_dir, "llava.json"))
        for batch in selection_batches(selection_url, JSON_BATCH_ROWS):
            if images == "none":  # no copies here: name the files in the workspace's image store
                for row in batch:
                    row["image_refs"] = row.get("stored_paths") or []
            if fmt == "llava":
                arrays["llava"].extend([llava_record(r) for r in batch])
            else:
                by_source: dict[str, list[dict[str, Any]]] = {}
                for row in batch:
                    by_source.setdefault(row["source"], []).append(pf1m_record(row))
                for source, records in by_source.items():
                    if source not in arrays:  # a file per source, opened when its first row comes
                        arrays[source] = JsonArrayFile(_join(out_dir, f"{source}.json"))
                    arrays[source].extend(records)
            n_items += len(batch)
            placed_images = place_images(batch, out_dir, images) > 0 or placed_images
        if not n_items:  # the (empty) images folder an empty selection has always had
            place_images([], out_dir, images)
    finally:  # closed on an error too: a file closed later (on remote storage) could upload a stray one
        with contextlib.ExitStack() as closing:  # every one, even after one fails to close
            for array in arrays.values():
                closing.callback(array.close)
    files = [f"{name}.json" for name in sorted(arrays)]
    return {"files": files + (["images/"] if placed_images else []), "n_items": n_items}


def _write_card(card: str | None, out_dir: str) -> None:
    if card is None:
        return
    url = _join(out_dir, "README.md")
    fs, path = url_to_fs(url)
    if fs.exists(path):
        with fs.open(path, "rb") as handle:
            if handle.read() == card.encode("utf-8"):  # unchanged: leave the file (and its mtime) alone
                return
    write_bytes_atomic(card.encode("utf-8"), url)


def write_export(
    selection_url: str,
    fmt: str,
    out_dir: str,
    images: str = "link",
    card: str | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Write the rows of ``selection_url`` to ``out_dir`` in format ``fmt``; when already done, only the card
    (facts of the lineage now: funnel, thresholds) is rewritten.

    The files go to a temporary sibling folder renamed to ``out_dir`` once complete. Returns the manifest:
    format, files (relative to the folder), item count, and ``path``: the folder now (not stored in it).
    """
    fs, local = url_to_fs(out_dir)
    done = _join(local, SUCCESS)
    if fs.exists(done):
        _write_card(card, out_dir)
        with fs.open(done, "rb") as handle:
            return {**json.loads(handle.read()), "path": out_dir}
    parent, name = out_dir.rstrip("/").rsplit("/", 1)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex[:12]}-{name}"  # a URL on the same storage: the writers take URLs
    tmp_local = url_to_fs(tmp)[1]
    fs.makedirs(tmp_local, exist_ok=True)
    try:
        manifest = {"format": fmt, **_write_format(selection_url, fmt, tmp, images, shard_bytes)}
        if card is not None:
            _write_card(card, tmp)
            manifest["files"].append("README.md")
        write_bytes_atomic(json.dumps(manifest, sort_keys=True).encode("utf-8"), _join(tmp, SUCCESS))
        if fs.exists(done):  # another run finished the same export meanwhile: keep its folder
            fs.rm(tmp_local, recursive=True)
            with fs.open(done, "rb") as handle:
                return {**json.loads(handle.read()), "path": out_dir}
        if fs.exists(local):  # a folder without _SUCCESS.json: left by a crash of an older version
            fs.rm(local, recursive=True)
        fs.mv(tmp_local, local, recursive=True)
    except BaseException:
        if fs.exists(tmp_local):
            fs.rm(tmp_local, recursive=True)
        raise
    return {**manifest, "path": out_dir}


@task(name="write-export", retries=1, retry_delay_seconds=2)
def write_export_task(
    job: dict, selection_url: str, images: str = "link", shard_bytes: int = SHARD_BYTES
) -> dict:
    """One format of one export: ``job`` holds ``format``, ``out_dir`` and its dataset ``card``."""
    return write_export(selection_url, job["format"], job["out_dir"], images, job.get("card"), shard_bytes)
