"""Tiny local datasets in the real Hub layouts of each adapter, for tests, benchmarks and trying things out.

Each builder writes files exactly as the Hub serves them (parquet with the `datasets` Image feature, the
same column names and types as DATASETS.md records, the same folder and file naming), including rows that
must fail (broken images, empty annotations), and returns the ``SourceSpec`` fields to ingest it plus the
counts a correct ingest gives. Images are drawn on the fly with PIL.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

TRUNCATED = "truncated"
EMPTY = "empty"
GARBAGE = "garbage"


def png(seed: int, size: int = 32, fmt: str = "PNG") -> bytes:
    """A small, distinct image per seed."""
    image = Image.new("RGB", (size, size), ((seed * 53) % 256, (seed * 97) % 256, (seed * 151) % 256))
    ImageDraw.Draw(image).rectangle((seed % 8, seed % 5, size - 4, size - 6), outline=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def image(seed: int | str) -> dict:
    """An Image-feature value: a good image for an int seed, or one of the broken kinds."""
    if seed == TRUNCATED:
        return {"bytes": png(999)[:40], "path": None}
    if seed == EMPTY:
        return {"bytes": b"", "path": None}
    if seed == GARBAGE:
        return {"bytes": b"this is not an image", "path": None}
    return {"bytes": png(int(seed)), "path": None}


@dataclass
class Built:
    """A built dataset: how to ingest it and what a correct ingest yields."""

    spec: dict[str, Any]
    ok: int
    failed: int
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # substrings the failed samples' errors must contain


def write_hub_parquet(folder: Path, rows: dict[str, list], features, split: str, config: str | None = None,
                      shard: str = "00000-of-00001", suffix: str = "") -> Path:
    """``<folder>/[<config>|data]/<split>-<shard><suffix>.parquet``, written by `datasets` itself."""
    import datasets

    datasets.disable_progress_bars()
    sub = folder / (config or "data")
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / f"{split}-{shard}{suffix}.parquet"
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))
    return path


def _f():
    import datasets

    return datasets


def vqav2(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"question_type": s, "multiple_choice_answer": s,
                "answers": d.List({"answer": s, "answer_confidence": s, "answer_id": d.Value("int64")}),
                "image_id": d.Value("int64"), "answer_type": s, "question_id": d.Value("int64"),
                "question": s, "image": d.Image()}
    answers = [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["down"] * 3 + ["table"])]]
    rows = {"question_type": ["none of the above", "what color", "how many", "is the", "what"],
            "multiple_choice_answer": ["down", "red", "2", "", "cat"],
            "answers": answers * 5, "image_id": [1, 2, 2, 3, 4],
            "answer_type": ["other", "other", "number", "yes/no", "other"],
            "question_id": [262148000, 2001, 2002, 3001, 4001],
            "question": ["Where is he looking?", "What color is the bus?", "How many dogs?", "Is it raining?", "What animal?"],
            "image": [image(1), image(2), image(2), image(3), image(TRUNCATED)]}
    write_hub_parquet(folder, rows, features, "validation")
    return Built({"adapter": "vqav2", "from": str(folder)}, ok=3, failed=2, errors=["annotation is empty", "bad image"])


def gqa(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"id": s, "imageId": s, "question": s, "answer": s, "fullAnswer": s, "isBalanced": d.Value("bool"),
                "groups": {"global": s, "local": s}, "entailed": s, "equivalent": s,
                "types": {"structural": s, "semantic": s, "detailed": s},
                "semantic": d.List({"operation": s, "argument": s, "dependencies": d.List(d.Value("int32"))}),
                "semanticStr": s}
    n = 5
    rows = {"id": ["201307251", "201640614", "202225914", "20000001", "20000002"],
            "imageId": ["n161313", "n161313", "n235859", "n235859", "n999999"],
            "question": ["Is it overcast?", "Who is wearing a dress?", "Is the tray on the left?", "What is it?", "Which color?"],
            "answer": ["no", "woman", "yes", None, "red"],
            "fullAnswer": ["No, it is clear.", "The woman is wearing a dress.", "Yes, it is.", None, "It is red."],
            "isBalanced": [True] * n, "groups": [{"global": None, "local": "10c-weather"}] * n,
            "entailed": ["[]"] * n, "equivalent": ['["201307251"]'] * n,
            "types": [{"structural": "verify", "semantic": "global", "detailed": "weatherVerify"}] * n,
            "semantic": [[{"operation": "select", "argument": "scene", "dependencies": []}]] * n,
            "semanticStr": ["select: scene"] * n}
    write_hub_parquet(folder, rows, features, "testdev", config="testdev_balanced_instructions")
    write_hub_parquet(folder, {"id": ["n161313", "n235859"], "image": [image(5), image(6)]},
                      {"id": s, "image": d.Image()}, "testdev", config="testdev_balanced_images")
    return Built({"adapter": "gqa", "from": str(folder)}, ok=3, failed=2,
                 errors=["annotation is missing", "not found in the GQA images config"])


def aokvqa(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"image": d.Image(), "question_id": s, "question": s, "choices": d.List(s),
                "correct_choice_idx": d.Value("int8"), "direct_answers": s, "difficult_direct_answer": d.Value("bool"),
                "rationales": d.List(s)}
    rows = {"image": [image(7), image(8), image(EMPTY), image(9)],
            "question_id": ["22jbM6gDxdaMaunuzgrsBB", "22MexNkBPpdZGX6sxbxVBH", "3x", "4x"],
            "question": ["What is in the motorcyclist's mouth?", "What is the man by the bags awaiting?", "Q?", "Q?"],
            "choices": [["toothpick", "food", "popsicle stick", "cigarette"], ["skateboard", "train", "delivery", "cab"],
                        ["a", "b"], ["a", "b"]],
            "correct_choice_idx": [3, 3, 0, None],
            "direct_answers": [str(["cigarette"] * 10), str(["cab"] * 8 + ["taxi"] * 2), "['a']", None],
            "difficult_direct_answer": [False, False, False, None],
            "rationales": [["He's smoking while riding.", "The man has a cigarette in his mouth."],
                           ["He has bags and is by the road.", "People wait for cabs with luggage.", "A taxi is coming."],
                           ["r"], None]}
    write_hub_parquet(folder, rows, features, "validation", suffix="-5d3a7e1f0c2b4a96")
    return Built({"adapter": "aokvqa", "from": str(folder)}, ok=2, failed=2, errors=["bad image", "annotation is missing"])


def okvqa(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"question_id": s, "image": d.Image(), "question": s, "answers": d.List(s), "question_type": s, "answer_type": s}
    first = {"question_id": ["2971475", "2971476"], "image": [image(10), image(GARBAGE)],
             "question": ["What sport can you use this for?", "What is this?"],
             "answers": [["race"] * 6 + ["motocross"] * 2 + ["ride"] * 2, ["x"] * 10],
             "question_type": ["one", "one"], "answer_type": ["other", "other"]}
    second = {"question_id": ["5", "6"], "image": [image(11), image(12)], "question": ["Which season?", "Why?"],
              "answers": [["winter"] * 10, []], "question_type": ["one", "eight"], "answer_type": ["other", "other"]}
    write_hub_parquet(folder, first, features, "val2014", shard="00000-of-00002")
    write_hub_parquet(folder, second, features, "val2014", shard="00001-of-00002")
    return Built({"adapter": "okvqa", "from": str(folder)}, ok=2, failed=2, errors=["bad image", "answers is empty"])


def textvqa(folder: Path) -> Built:
    d = _f()
    s, i32, ls = d.Value("string"), d.Value("int32"), d.List(d.Value("string"))
    features = {"image_id": s, "question_id": i32, "question": s, "question_tokens": ls, "image": d.Image(),
                "image_width": i32, "image_height": i32, "flickr_original_url": s, "flickr_300k_url": s,
                "answers": ls, "image_classes": ls, "set_name": s, "ocr_tokens": ls}
    rows = {"image_id": ["003a8ae2ef43b901", "00b2a0d4c3ad5c0f", "0c1e2f"], "question_id": [34602, 34603, 34604],
            "question": ["what is the brand of this camera?", "what number is on the shirt?", "what does it say?"],
            "question_tokens": [["what"]] * 3, "image": [image(13), image(14), image(15)],
            "image_width": [32] * 3, "image_height": [32] * 3, "flickr_original_url": [""] * 3, "flickr_300k_url": [""] * 3,
            "answers": [["nous les gosses", "dakota", "dakota", "clos culombu"], ["23"] * 10, None],
            "image_classes": [["Camera"]] * 3, "set_name": ["val"] * 3, "ocr_tokens": [["dakota", "digital"], ["23"], []]}
    write_hub_parquet(folder, rows, features, "validation")
    return Built({"adapter": "textvqa", "from": str(folder)}, ok=2, failed=1, errors=["answers is missing"])


def ocrvqa(folder: Path) -> Built:
    d = _f()
    s, f64 = d.Value("string"), d.Value("float64")
    features = {"image": d.Image(), "image_id": s, "questions": d.List(s), "answers": d.List(s),
                "ocr_tokens": d.List(s),
                "ocr_info": d.List({"word": s, "bounding_box": {"width": f64, "height": f64, "top_left_x": f64, "top_left_y": f64}}),
                "title": s, "authorName": s, "genre": s, "image_width": d.Value("int64"), "image_height": d.Value("int64"),
                "image_url": s, "set_name": s}
    box = {"width": 0.2, "height": 0.1, "top_left_x": 0.1, "top_left_y": 0.1}
    rows = {"image": [image(16), image(TRUNCATED)], "image_id": ["1565922468", "0451526538"],
            "questions": [["Who wrote this book?", "What is the title of this book?", "Is this a romantic book?"],
                          ["Who wrote this book?", "What is the genre of this book?"]],
            "answers": [["Jane Doe", "", "No"], ["Mark Twain", "Literature & Fiction"]],
            "ocr_tokens": [["Jane"], ["Mark"]], "ocr_info": [[{"word": "Jane", "bounding_box": box}], []],
            "title": ["A Book", "Another"], "authorName": ["Jane Doe", "Mark Twain"], "genre": ["Travel", "Literature & Fiction"],
            "image_width": [32, 32], "image_height": [32, 32], "image_url": ["", ""], "set_name": ["val", "val"]}
    write_hub_parquet(folder, rows, features, "validation", shard="00000-of-00002", suffix="-ab12cd34ef56ab78")
    return Built({"adapter": "ocrvqa", "from": str(folder)}, ok=2, failed=3, errors=["annotation is empty", "bad image"])


def scienceqa(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"image": d.Image(), "question": s, "choices": d.List(s), "answer": d.Value("int8"),
                **{k: s for k in ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")}}
    n = 5
    rows = {"image": [image(17), None, image(18), None, image(19)],
            "question": ["Which of these states is farthest north?", "What is the capital of Arizona?",
                         "Which animal's feet are adapted for digging?", "Text only?", "Broken index?"],
            "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["Tucson", "Mesa", "Flagstaff", "Phoenix"],
                        ["mole", "duck"], ["a", "b"], ["a", "b"]],
            "answer": [0, 3, 0, 1, 7],
            "hint": ["", "", "Moles dig burrows.", "", ""], "task": ["closed choice"] * n, "grade": ["grade2"] * n,
            "subject": ["social science", "social science", "natural science", "x", "x"], "topic": ["geography"] * n,
            "category": ["Geography"] * n, "skill": ["Read a map: cardinal directions"] * n,
            "lecture": ["Maps have four cardinal directions."] * n,
            "solution": ["To find the answer, look at the compass rose. West Virginia is farthest north.", "", "", "", ""]}
    write_hub_parquet(folder, rows, features, "validation", shard="00000-of-00001", suffix="-6e0a4c1b2d3f4e5a")
    return Built({"adapter": "scienceqa", "from": str(folder)}, ok=2, failed=1, skipped=2, errors=["not a valid index"])


def clevr(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"images": d.List(d.Image()), "texts": d.List({"user": s, "assistant": s, "source": s})}
    sfx = "\nGive a very brief answer."

    def turn(q: str, a: str) -> dict:
        return {"user": q + sfx, "assistant": a, "source": "clevr"}

    rows = {"images": [[image(20)], [image(21)], [image(GARBAGE)]],
            "texts": [[turn("Are there any cylinders?", "No."), turn("How many cubes?", "2."), turn("What is the big sphere made of?", "Rubber.")],
                      [turn("What color is the cube?", "Gray."), turn("Is it shiny?", "")],
                      [turn("What shape?", "Cube."), turn("What size?", "Small.")]]}
    write_hub_parquet(folder, rows, features, "train", config="clevr", shard="00000-of-00024", suffix="-1f2e3d4c5b6a7988")
    return Built({"adapter": "clevr", "from": str(folder)}, ok=4, failed=3, errors=["annotation is empty", "bad image"])


def coco_boxes(folder: Path, box_format: str = "xyxy") -> Path:
    """A detection-datasets/coco style boxes source for images 397133 and 37777.

    As its ``dataset_infos.json`` declares: ``objects`` is a ``Sequence`` of a struct (stored as a struct of
    lists) with ``category`` a ClassLabel. ``box_format`` ``xywh`` writes COCO-json style boxes instead.
    """
    d = _f()
    i64 = d.Value("int64")
    features = {"image_id": i64, "image": d.Image(), "width": i64, "height": i64,
                "objects": d.Sequence({"bbox_id": i64, "category": d.ClassLabel(names=["person", "bicycle", "oven", "pizza"]),
                                       "bbox": d.Sequence(d.Value("float32"), length=4), "iscrowd": d.Value("bool"),
                                       "area": d.Value("float64")})}
    boxes = [[[64.0, 42.7, 320.0, 427.0], [0.0, 200.0, 200.0, 400.0], [500.0, 100.0, 600.0, 200.0]],
             [[10.0, 10.0, 100.0, 100.0]]]
    if box_format == "xywh":
        boxes = [[[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in image] for image in boxes]
    rows = {"image_id": [397133, 37777], "image": [image(30), image(31)], "width": [640, 352], "height": [427, 230],
            "objects": [{"bbox_id": [1, 2, 4], "category": [0, 2, 1], "bbox": boxes[0], "iscrowd": [False] * 3,
                         "area": [1.0] * 3},
                        {"bbox_id": [3], "category": [3], "bbox": boxes[1], "iscrowd": [False], "area": [1.0]}]}
    write_hub_parquet(folder, rows, features, "val", shard="00000-of-00002", suffix="-9a8b7c6d5e4f3a2b")
    return folder


def coco_captions(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"question_id": s, "image": d.Image(), "question": s, "answer": d.List(s), "id": d.Value("int64"),
                "license": d.Value("int8"), "file_name": s, "coco_url": s, "height": d.Value("int32"),
                "width": d.Value("int32"), "date_captured": s}
    q = "Provide a one-sentence caption for the provided image."
    rows = {"question_id": ["000000397133.jpg", "000000037777.jpg", "000000252219.jpg"],
            "image": [image(22), image(23), image(24)], "question": [q] * 3,
            "answer": [["A man is in a kitchen making pizzas.", "Man in apron standing on front of oven with pans and bakeware",
                        "A baker is working in the kitchen rolling dough.", "A person standing by a stove in a kitchen.",
                        "A table with pies being made and a person standing near a wall with pots and pans hanging on the wall."],
                       ["The dining table near the kitchen has a bowl of fruit on it.", "A small kitchen has various appliances and a table.",
                        "The kitchen is clean and ready for us to see.", "A kitchen and dining area decorated in white.",
                        "A kitchen that has a bowl of fruit on the table."],
                       []],
            "id": [397133, 37777, 252219], "license": [4, 1, 4],
            "file_name": ["000000397133.jpg", "000000037777.jpg", "000000252219.jpg"], "coco_url": [""] * 3,
            "height": [427, 230, 428], "width": [640, 352, 640], "date_captured": ["2013-11-14 17:02:52"] * 3}
    write_hub_parquet(folder, rows, features, "val", shard="00000-of-00002")
    return Built({"adapter": "coco_captions", "from": str(folder)}, ok=2, failed=1, errors=["answer is empty"])


def flickr30k(folder: Path) -> Built:
    d = _f()
    s = d.Value("string")
    features = {"image": d.Image(), "caption": d.List(s), "sentids": d.List(s), "img_id": s, "filename": s}
    caps = ["Two young guys with shaggy hair look at their hands while hanging out in the yard.",
            "Two young, White males are outside near many bushes.", "Two men in green shirts are standing in a yard.",
            "A man in a blue shirt standing in a garden.", "Two friends enjoy time spent together."]
    rows = {"image": [image(25), None, image(26)], "caption": [caps, caps, [c.upper() for c in caps]],
            "sentids": [[str(i) for i in range(5)]] * 3, "img_id": ["0", "1", "2"],
            "filename": ["1000092795.jpg", "10002456.jpg", "1000268201.jpg"]}
    write_hub_parquet(folder, rows, features, "test", shard="00000-of-00009")
    return Built({"adapter": "flickr30k", "from": str(folder)}, ok=2, failed=1, errors=["image missing"])


def textcaps(folder: Path) -> Built:
    d = _f()
    s, i64 = d.Value("string"), d.Value("int64")
    features = {"question_id": s, "question": s, "image": d.Image(), "image_id": s, "image_classes": d.List(s),
                "flickr_original_url": s, "flickr_300k_url": s, "image_width": i64, "image_height": i64, "set_name": s,
                "image_name": s, "image_path": s, "caption_id": d.List(i64), "caption_str": d.List(s), "reference_strs": d.List(s)}
    q = "Please carefully observe the image and come up with a caption for the image."
    rows = {"question_id": ["q1", "q2", "q3"], "question": [q] * 3, "image": [image(27), image(28), image(29)],
            "image_id": ["011e7e629fb9ae7b", "0de8d3b8e8b4c6f1", "0f0f0f"], "image_classes": [["Bottle"], ["Sign"], []],
            "flickr_original_url": [""] * 3, "flickr_300k_url": [""] * 3, "image_width": [32] * 3, "image_height": [32] * 3,
            "set_name": ["val"] * 3, "image_name": ["a", "b", "c"], "image_path": ["val/a.jpg", "val/b.jpg", "val/c.jpg"],
            "caption_id": [[1, 2], [3], []],
            "caption_str": [["A bottle of Coca-Cola sits on a table.", "A red label reads Coca-Cola."], ["A sign says STOP."], []],
            "reference_strs": [["a bottle"], ["a sign"], []]}
    write_hub_parquet(folder, rows, features, "val", shard="00000-of-00001")
    return Built({"adapter": "textcaps", "from": str(folder)}, ok=3, failed=1, errors=["caption_str is empty"])


def llava_instruct(folder: Path) -> Built:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "000000033471.jpg").write_bytes(png(40, fmt="JPEG"))
    (folder / "images" / "000000052846.jpg").write_bytes(png(41, fmt="JPEG"))
    (folder / "images" / "000000000009.jpg").write_bytes(b"")
    records = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is positioned on top of the back of the couch in the living room."},
            {"from": "human", "value": "What is the cat doing?"},
            {"from": "gpt", "value": ""}]},
        {"id": "000000000009", "image": "000000000009.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A meal in a box."}]},
        {"id": "000000000010", "image": "000000000010.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A giraffe."}]},
    ]
    (folder / "llava_instruct_150k.json").write_text(json.dumps(records, indent=1))
    return Built({"adapter": "llava_instruct", "from": str(folder)}, ok=3, failed=3,
                 errors=["annotation is empty", "empty (0 bytes)", "image file not found"])


BUILDERS = {f.__name__: f for f in (vqav2, gqa, aokvqa, okvqa, textvqa, ocrvqa, scienceqa, clevr,
                                     coco_captions, flickr30k, textcaps, llava_instruct)}


def _legacy(feature: Any) -> Any:
    """datasets 5 feature JSON -> the datasets 2.x form real Hub files from 2023-24 carry."""
    if isinstance(feature, dict) and feature.get("_type") == "List":
        inner = _legacy(feature["feature"])
        if isinstance(inner, dict) and "_type" not in inner:
            return [inner]  # a list of structs was written as a one-element JSON list
        out = {"feature": inner, "_type": "Sequence"}
        if feature.get("length", -1) != -1:
            out["length"] = feature["length"]
        return out
    if isinstance(feature, dict):
        return {k: _legacy(v) if isinstance(v, dict | list) else v for k, v in feature.items()}
    return feature


def to_legacy_metadata(path: Path) -> None:
    """Rewrite a parquet file's ``huggingface`` schema metadata in the datasets 2.x form (same data)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    info = json.loads(meta[b"huggingface"])
    info["info"]["features"] = {k: _legacy(v) for k, v in info["info"]["features"].items()}
    meta[b"huggingface"] = json.dumps(info).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def ingest_locally(spec: dict, workspace_root: str, shard_size: int = 1000):
    """Plan and run every shard of one source in this process, without Prefect or DuckDB.

    Returns ``(shard results, samples, images rows)``: what a test or a quick look needs.
    """
    import pyarrow as pa

    from polite.config.ingest import SourceSpec
    from polite.record import table_to_samples
    from polite.shards import read_table
    from tasks.ingest import ingest_shard, plan_source
    from tasks.sources.loading import clear_cache

    clear_cache()
    plan = plan_source(SourceSpec.model_validate(spec), workspace_root, shard_size)
    results = [ingest_shard(item) for item in plan.items]
    samples = table_to_samples(pa.concat_tables([read_table(r["samples"]) for r in results]))
    images = pa.concat_tables([read_table(r["images"]) for r in results]).to_pylist()
    return results, samples, images
