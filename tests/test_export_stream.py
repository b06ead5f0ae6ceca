"""The JSON layouts (pf1m, llava) stream: the selection is read a batch at a time and each array is written as it
comes, byte for byte what writing all records at once with ``json.dumps(records, ensure_ascii=False, indent=1)``
gave, with memory that does not grow with the selection."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_export_flow import _tree, populate

QUIET = {"export": {"report": "none"}}


def _row(i: int, source: str, output: str | None = None) -> dict:
    """One selection row as the flow writes it (the columns the JSON layouts read)."""
    return {
        "sample_id": f"s_{i:05d}",
        "rewrite_id": f"r_{i:05d}",
        "source": source,
        "split": "validation" if i % 5 == 0 else "train",
        "task_type": "vqa",
        "instruction": f"<image>Question {i}: what is «here»?\nAnswer briefly.",
        "raw_response": "red" if i % 2 else None,
        "output": output if output is not None else f"Answer {i}: \"quoted\", ünïcödé, \\ and a\nnew line.",
        "rewrite": f"Answer {i}.\n\nA cut paragraph.",
        "reward": None if i % 3 else i / 7,
        "rouge": 0.5,
        "nli": None,
        "semantic": 0.25 * (i % 4),
        "clipscore": 21.0 if i % 4 == 0 else None,
        "clip_details": json.dumps({"paragraph_scores": [21.0, 12.5]}) if i % 4 == 0 else None,
        "image_paths": [f"/ws/images/ab/i_{i % 3}.png"],
        "stored_paths": [f"images/ab/i_{i % 3}.png"],
    }


def _selection(tmp_path: Path, rows: list[dict], name: str = "selection.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _as_before(selection_url: str, fmt: str, images: str) -> dict[str, bytes]:
    """What the JSON layouts were before they streamed: every record in memory, one json.dumps per file."""
    from tasks.export import llava_record, pf1m_record

    rows = pq.read_table(selection_url).to_pylist()
    if images == "none":
        for row in rows:
            row["image_refs"] = row["stored_paths"]
    dump = lambda records: json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8")  # noqa: E731
    if fmt == "llava":
        return {"llava.json": dump([llava_record(r) for r in rows])}
    sources = sorted({r["source"] for r in rows})
    return {f"{s}.json": dump([pf1m_record(r) for r in rows if r["source"] == s]) for s in sources}


@pytest.mark.parametrize("batch", [[], [{}], [{"a": []}, {"b": {}}], [{"x": "a\nb", "y": [1.5, None, "é"]}] * 5])
def test_a_json_array_written_in_batches_is_what_json_dumps_writes_at_once(tmp_path, batch):
    from tasks.export import JsonArrayFile

    for split in (1, 2, 3, 100):
        url = str(tmp_path / f"a-{split}.json")
        array = JsonArrayFile(url)
        for start in range(0, len(batch), split):
            array.extend(batch[start : start + split])
        array.extend([])  # an empty batch writes nothing
        array.close()
        array.close()  # closing twice ends the array once
        assert Path(url).read_bytes() == json.dumps(batch, ensure_ascii=False, indent=1).encode("utf-8")


@pytest.mark.parametrize("fmt", ["pf1m", "llava"])
@pytest.mark.parametrize("rows_per_batch", [1, 2, 3, 7, 10_000])
def test_json_layouts_in_batches_are_the_bytes_written_all_at_once(tmp_path, monkeypatch, fmt, rows_per_batch):
    """Sources interleave in sample_id order (as hashed ids do), so pf1m has a file per source open at once."""
    import tasks.export as texport

    rows = [_row(i, ("vqav2", "gqa", "coco")[i % 3 if i % 7 else 0]) for i in range(23)]
    url = _selection(tmp_path, rows)
    monkeypatch.setattr(texport, "JSON_BATCH_ROWS", rows_per_batch)
    out = tmp_path / "out"
    out.mkdir()
    manifest = texport.write_json_layout(url, fmt, str(out), "none")
    expected = _as_before(url, fmt, "none")
    assert manifest == {"files": sorted(expected), "n_items": 23}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == expected


def test_an_empty_selection_keeps_its_empty_files_and_images_folder(tmp_path):
    from tasks.export import write_json_layout

    url = _selection(tmp_path, [], "empty.parquet")
    pq.write_table(pa.Table.from_pylist([_row(0, "gqa")]).schema.empty_table(), url)
    for fmt, files in (("llava", {"llava.json": b"[]"}), ("pf1m", {})):
        out = tmp_path / fmt
        out.mkdir()
        assert write_json_layout(url, fmt, str(out), "link") == {"files": sorted(files), "n_items": 0}
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
        assert (out / "images").is_dir()  # as the layouts have always had it (an empty folder)


def test_a_multi_batch_export_is_byte_identical_to_a_single_batch_one(workspace, prefect_harness, monkeypatch):
    """Through the flow, with images linked: every file of both folders (records, manifest, card, images)."""
    import tasks.export as texport
    from flows.export import export_flow

    populate(workspace)
    monkeypatch.setattr(texport, "JSON_BATCH_ROWS", 2)  # 5 items: batches of 2, 2, 1
    read = []
    real = texport.selection_batches
    monkeypatch.setattr(texport, "selection_batches", lambda url, rows=None: (read.append(rows) or b for b in real(url, rows)))
    small = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m", "llava"])
    assert read == [2] * 6  # three batches per format: never the whole selection at once
    trees = {fmt: _tree(info["path"]) for fmt, info in small["exports"].items()}
    selection_url = next(Path(workspace.root, "shards", "exports").glob("selection-*.parquet"))
    for fmt in ("pf1m", "llava"):
        for name, data in _as_before(str(selection_url), fmt, "link").items():
            assert trees[fmt][name] == data
        shutil.rmtree(small["exports"][fmt]["path"])
    monkeypatch.setattr(texport, "JSON_BATCH_ROWS", 10_000)
    whole = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m", "llava"])
    assert whole["exports"] == small["exports"]
    assert {fmt: _tree(info["path"]) for fmt, info in whole["exports"].items()} == trees
    assert sorted(trees["pf1m"]) == ["README.md", "_SUCCESS.json", "coco.json", "gqa.json",
                                     *sorted(f"images/{p.name}" for p in Path(small["exports"]["pf1m"]["path"], "images").iterdir())]  # fmt: skip


def test_the_memory_a_json_layout_holds_does_not_grow_with_the_selection(tmp_path, monkeypatch):
    """8,000 rows of 5 KB responses (40 MB of text): the writer's Python memory stays near one batch's."""
    import tasks.export as texport

    rows = [_row(i, ("gqa", "coco")[i % 2], output="x" * 5000 + str(i)) for i in range(8000)]
    url = _selection(tmp_path, rows)
    del rows
    monkeypatch.setattr(texport, "JSON_BATCH_ROWS", 256)
    for fmt in ("pf1m", "llava"):
        out = tmp_path / fmt
        out.mkdir()
        tracemalloc.start()
        try:
            texport.write_json_layout(url, fmt, str(out), "none")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        written = sum(p.stat().st_size for p in out.iterdir())
        assert written > 40_000_000
        assert peak < 10_000_000, f"{fmt}: {peak / 1e6:.1f} MB of Python objects at the peak"


def test_a_json_array_lets_its_file_go_when_its_last_write_fails(tmp_path):
    """A full disk at the closing bracket: the error is raised, and the file is closed all the same."""
    from tasks.export import JsonArrayFile

    array = JsonArrayFile(str(tmp_path / "a.json"))
    array.extend([{"a": 1}])

    def disk_full(data):
        raise OSError(28, "No space left on device")

    array._handle.write = disk_full
    with pytest.raises(OSError, match="No space left"):
        array.close()
    assert array._handle.closed
