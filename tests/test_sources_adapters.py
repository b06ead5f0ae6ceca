"""Every named adapter on a tiny local dataset in its real Hub layout, read through `datasets`.

Each dataset holds good rows and rows that must fail (broken images, empty annotations) or be skipped;
the shard function (no Prefect here) must give exactly the expected ok/failed/skipped counts and records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet
import pytest

from polite.config import SourceSpec
from polite.config.ingest import ADAPTER_NAMES
from polite.images import ImageStore
from polite.record import IMAGE_MARKER, TASK_TYPES
from tasks.ingest import plan_source
from tasks.sources import ADAPTERS, fixtures


def run_source(spec: dict, workspace, shard_size: int = 1000):
    return fixtures.ingest_locally(spec, workspace.root, shard_size)


def test_config_names_every_registered_adapter():
    assert set(ADAPTER_NAMES) == set(ADAPTERS)


@pytest.mark.parametrize("name", sorted(fixtures.BUILDERS))
def test_named_adapter_on_its_real_layout(name, tmp_path, workspace):
    built = fixtures.BUILDERS[name](tmp_path / name)
    results, samples, images = run_source(built.spec, workspace)
    counts = {k: sum(r[k] for r in results) for k in ("ok", "failed", "skipped")}
    assert counts == {"ok": built.ok, "failed": built.failed, "skipped": built.skipped}
    ok = [s for s in samples if s.status == "ok"]
    failed = [s for s in samples if s.status == "failed"]
    assert len(ok) == built.ok and len(failed) == built.failed
    assert len({s.sample_id for s in samples}) == len(samples), "sample ids must be unique"
    for expected in built.errors:
        assert any(expected in (s.error or "") for s in failed), (expected, [s.error for s in failed])
    store = ImageStore(workspace.images)
    known = {row["image_id"]: row for row in images}
    for s in ok:
        assert s.source == name and s.task_type in TASK_TYPES
        assert s.raw_response.strip() and s.instruction.count(IMAGE_MARKER) == len(s.images) >= 1
        for image_id in s.images:  # every referenced image is in the images shard and readable from the store
            assert known[image_id]["path"].startswith("images/")  # stored relative to the workspace
            assert store.open(workspace.locate(known[image_id]["path"])).size[0] > 0
    for s in failed:
        assert s.error and not s.images and s.raw_response == ""


def _by_key(samples):
    return {(s.source_key, s.sample_id): s for s in samples if s.status == "ok"}


def test_vqa_style_adapters_keep_question_and_answer(tmp_path, workspace):
    _, samples, _ = run_source(fixtures.vqav2(tmp_path / "v").spec, workspace)
    first = next(s for s in samples if s.source_key == "262148000")
    assert first.raw_response == "down" and "where is he looking?" in first.instruction.lower()
    assert first.meta["answers"][:3] == ["down"] * 3
    # two questions on one image store it once
    same = [s for s in samples if s.source_key in ("2001", "2002")]
    assert [s.status for s in same] == ["ok", "ok"] and len({tuple(s.images) for s in same}) == 1


def test_aokvqa_raw_is_answer_plus_rationales(tmp_path, workspace):
    _, samples, _ = run_source(fixtures.aokvqa(tmp_path / "a").spec, workspace)
    s = next(s for s in samples if s.source_key == "22jbM6gDxdaMaunuzgrsBB")
    assert s.task_type == "vqa_rationale"
    assert s.raw_response == "Answer: cigarette. He's smoking while riding. The man has a cigarette in his mouth."


def test_gqa_joins_images_and_ocrvqa_splits_parallel_lists(tmp_path, workspace):
    _, samples, _ = run_source(fixtures.gqa(tmp_path / "g").spec, workspace)
    ok = {s.source_key: s for s in samples if s.status == "ok"}
    assert ok["201307251"].images == ok["201640614"].images != ok["202225914"].images
    assert ok["201307251"].meta["full_answer"] == "No, it is clear."
    _, samples, _ = run_source(fixtures.ocrvqa(tmp_path / "o").spec, workspace)
    cover = sorted((s for s in samples if s.source_key == "1565922468"), key=lambda s: s.sample_id)
    assert {s.status for s in cover} == {"ok", "failed"} and len(cover) == 3
    assert {s.raw_response for s in cover if s.status == "ok"} == {"Jane Doe", "No"}


def test_scienceqa_and_clevr(tmp_path, workspace):
    _, samples, _ = run_source(fixtures.scienceqa(tmp_path / "s").spec, workspace)
    north = next(s for s in samples if s.status == "ok" and "farthest north" in s.instruction)
    assert "Options: West Virginia, Louisiana, Arizona, Oklahoma" in north.instruction
    assert north.raw_response.startswith("Answer: West Virginia. To find the answer")
    mole = next(s for s in samples if s.status == "ok" and "digging" in s.instruction)
    assert "Context: Moles dig burrows." in mole.instruction
    _, samples, _ = run_source(fixtures.clevr(tmp_path / "c").spec, workspace)
    turns = sorted((s for s in samples if s.source_key == "0"), key=lambda s: s.raw_response)
    assert [s.raw_response for s in turns] == ["2.", "No.", "Rubber."]
    assert all("Give a very brief answer" not in s.instruction for s in turns)


def test_captions_adapters(tmp_path, workspace):
    _, samples, _ = run_source(fixtures.flickr30k(tmp_path / "f").spec, workspace)
    s = next(s for s in samples if s.status == "ok")
    assert len(s.raw_response.split("\n")) == 5 and len(s.meta["captions"]) == 5 and s.task_type == "caption"
    _, samples, _ = run_source(fixtures.textcaps(tmp_path / "t").spec, workspace)
    coke = [s for s in samples if s.source_key == "011e7e629fb9ae7b"]
    assert sorted(s.raw_response for s in coke) == ["A bottle of Coca-Cola sits on a table.", "A red label reads Coca-Cola."]


def test_coco_captions_with_boxes_joined_on_image_id(tmp_path, workspace):
    built = fixtures.coco_captions(tmp_path / "cc")
    boxes = fixtures.coco_boxes(tmp_path / "det")
    _, plain, _ = run_source(built.spec, workspace)
    assert "\n\n" not in next(s for s in plain if s.source_key == "397133").raw_response
    spec = built.spec | {"name": "coco_boxes", "options": {"boxes_from": str(boxes)}}
    _, samples, _ = run_source(spec, workspace)
    pizza = next(s for s in samples if s.source_key == "397133")
    assert pizza.raw_response.split("\n")[0] == "A man is in a kitchen making pizzas."
    assert "person: [0.100, 0.100, 0.500, 1.000]" in pizza.raw_response
    assert pizza.meta["boxes"][1][0] == "oven" and len(pizza.meta["captions"]) == 5
    kitchen = next(s for s in samples if s.source_key == "37777")
    assert kitchen.meta["boxes"] == [["pizza", pytest.approx([10 / 352, 10 / 230, 100 / 352, 100 / 230])]]
    # COCO-json [x, y, w, h] boxes: the same result with box_format=xywh
    xywh = fixtures.coco_boxes(tmp_path / "det_xywh", box_format="xywh")
    spec = built.spec | {"name": "coco_xywh", "options": {"boxes_from": str(xywh), "box_format": "xywh"}}
    _, samples, _ = run_source(spec, workspace)
    assert next(s for s in samples if s.source_key == "397133").raw_response == pizza.raw_response
    # the wrong format is caught before any work
    with pytest.raises(ValueError, match="box_format=xywh"):
        run_source(built.spec | {"options": {"boxes_from": str(xywh)}}, workspace)


def test_llava_each_gpt_turn_is_a_conversation_sample(tmp_path, workspace):
    _, samples, _ = run_source(fixtures.llava_instruct(tmp_path / "l").spec, workspace)
    bus = sorted((s for s in samples if s.source_key.startswith("000000033471")), key=lambda s: len(s.meta["history"]))
    assert [s.task_type for s in bus] == ["conversation", "conversation"]
    assert bus[0].instruction == "<image>What are the colors of the bus in the image?"
    assert bus[1].instruction == "<image>What feature can be seen on the back of the bus?"
    assert bus[1].meta["history"][1]["value"] == "The bus in the image is white and red."
    cat = next(s for s in samples if s.source_key.startswith("000000052846") and s.status == "ok")
    assert cat.instruction == "<image>Where is the cat positioned in the image?"


def test_missing_column_fails_before_any_work_naming_it(tmp_path, workspace):
    built = fixtures.flickr30k(tmp_path / "f")
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(next((tmp_path / "f").rglob("*.parquet"))), split="train")
    ds.remove_columns(["caption"]).to_parquet(str(tmp_path / "nocap.parquet"))
    with pytest.raises(ValueError, match=r"column\(s\) \['caption'\] not found; columns found: \['filename', 'image'"):
        plan_source(SourceSpec.model_validate(built.spec | {"from": str(tmp_path / "nocap.parquet")}), workspace.root, 10)
    assert not list(Path(workspace.root).rglob("*.parquet")), "nothing may be written before the check"


def test_shards_are_deterministic_and_reused(tmp_path, workspace):
    spec = fixtures.vqav2(tmp_path / "v").spec
    first, samples, _ = run_source(spec, workspace, shard_size=2)
    assert len(first) == 3 and not any(r["reused"] for r in first)
    written = {r["samples"]: Path(r["samples"]).stat().st_mtime_ns for r in first}
    again, samples2, _ = run_source(spec, workspace, shard_size=2)
    assert all(r["reused"] for r in again)
    assert {r["samples"]: Path(r["samples"]).stat().st_mtime_ns for r in again} == written  # not rewritten
    assert [s.sample_id for s in samples] == [s.sample_id for s in samples2]
    assert json.dumps([r["ok"] for r in first]) == json.dumps([r["ok"] for r in again])
    # a reused shard is read back, so it says nothing about determinism: build the shards again elsewhere
    other = type(workspace).resolve(str(tmp_path / "other")).ensure()
    rebuilt, samples3, _ = run_source(spec, other, shard_size=2)
    assert not any(r["reused"] for r in rebuilt)
    assert [Path(r["samples"]).relative_to(other.root) for r in rebuilt] == [
        Path(r["samples"]).relative_to(workspace.root) for r in first
    ]

    # every field, errors included: an undecodable image's error text is the same on every ingest
    assert [s.to_row() for s in samples3] == [s.to_row() for s in samples]


def test_files_with_datasets_2x_feature_metadata_load(tmp_path, workspace):
    built = fixtures.ocrvqa(tmp_path / "o")
    path = next((tmp_path / "o").rglob("*.parquet"))
    fixtures.to_legacy_metadata(path)
    assert b'"_type": "Sequence"' in pa.parquet.read_schema(path).metadata[b"huggingface"]
    results, _, _ = run_source(built.spec, workspace)
    assert sum(r["ok"] for r in results) == built.ok


def test_columnar_samples_table_matches_the_row_form():
    from polite.record import SAMPLE_SCHEMA, Sample, samples_to_table

    samples = [Sample("s_a", "x", "train", "vqa", "<image>Q?", "r", images=["i_1"], meta={"b": 1, "a": [2]},
                      status="failed", error="e"), Sample("s_b", "x", "train", "caption", "<image>", "c")]
    rows = pa.Table.from_pylist([s.to_row() for s in samples], schema=SAMPLE_SCHEMA)
    assert samples_to_table(samples).equals(rows)


def test_llava_without_an_image_folder_fails_before_any_work(tmp_path, workspace):
    built = fixtures.llava_instruct(tmp_path / "l")
    json_file = tmp_path / "l" / "llava_instruct_150k.json"
    with pytest.raises(ValueError, match="image_folder=DIR"):
        plan_source(SourceSpec.model_validate(built.spec | {"from": str(json_file),
                                                            "options": {"image_folder": str(tmp_path / "nope")}}),
                    workspace.root, 10)
    # pointing at the folder explicitly works with the JSON file alone
    spec = built.spec | {"from": str(json_file), "options": {"image_folder": str(tmp_path / "l" / "images")}}
    results, _, _ = run_source(spec, workspace)
    assert sum(r["ok"] for r in results) == built.ok


def test_llava_records_sharing_an_image_id_keep_distinct_sample_ids(tmp_path, workspace):
    # llava_instruct_150k.json joins conversation_58k, detail_23k and complex_reasoning_77k, whose `id` is the
    # COCO image id: one image has several records. Each record's samples must survive, not collide.
    built = fixtures.llava_instruct(tmp_path / "l")
    path = tmp_path / "l" / "llava_instruct_150k.json"
    records = json.loads(path.read_text())
    detail = {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "Describe the following image.\n<image>"},
        {"from": "gpt", "value": "A white and red bus drives down a city street."}]}  # fmt: skip
    path.write_text(json.dumps([*records, detail, records[0]]))  # the bus again, and an exact repeat
    _, samples, _ = run_source(built.spec, workspace)
    ok = [s for s in samples if s.status == "ok"]
    assert len(ok) == built.ok + 1 + 2
    assert len({s.sample_id for s in ok}) == built.ok + 1  # the exact repeat is the same samples
    bus = [s for s in ok if s.source_key.startswith("000000033471")]
    assert {s.raw_response for s in bus} >= {"The bus in the image is white and red.",
                                             "A white and red bus drives down a city street."}  # fmt: skip


def test_aokvqa_direct_answers_that_are_not_a_list_fail_the_row():
    from tasks.sources.base import RowError
    from tasks.sources.vqa import AOKVQA

    adapter = AOKVQA(SourceSpec(adapter="aokvqa", from_="x"))
    row = {"image": None, "question": "What is he holding?", "choices": [], "correct_choice_idx": None,
           "rationales": ["He holds it."]}  # fmt: skip
    (draft,) = adapter.map_row(row | {"direct_answers": "['pipe', 'pipe', 'cigar']"}, 0)
    assert draft.raw == "Answer: pipe. He holds it."
    with pytest.raises(RowError, match="direct_answers is not a list"):
        list(adapter.map_row(row | {"direct_answers": "'cigarette'"}, 0))  # not "Answer: t."


def test_coco_boxes_with_a_null_coordinate_are_skipped_not_fatal():
    import datasets

    from tasks.sources.captions import BoxSource

    objects = [[{"bbox": [10.0, 20.0, 50.0, 60.0], "category": "dog"}, {"bbox": [1.0, None, 3.0, 4.0], "category": "cat"}]]
    ds = datasets.Dataset.from_dict({"image_id": [7], "width": [100], "height": [100], "objects": objects})
    boxes = BoxSource(ds, "xyxy", "inline")  # the format check reads the same rows: it must not raise either
    assert boxes.get(7) == [("dog", [0.1, 0.2, 0.5, 0.6])]
