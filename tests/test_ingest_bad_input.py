"""Bad input at ingest: a mistyped value, a malformed line or an unreadable image fails its own sample, with the
reason; a bad option or mapping stops before any work with a message that says what to fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polite.config import SourceSpec
from tasks.ingest import plan_source
from tasks.sources import fixtures
from tasks.sources.loading import SourceError

VQA = {"task_type": "vqa", "key": "qid", "image": "image", "instruction": "question", "response": "answer"}


def _images(folder: Path, n: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        (folder / f"{i}.png").write_bytes(fixtures.png(i))
        paths.append(str(folder / f"{i}.png"))
    return paths


def _jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _ingest(path: str, workspace, mapping: dict = VQA, **spec) -> dict:
    _, samples, _ = fixtures.ingest_locally({"adapter": "generic", "from": path, "mapping": mapping} | spec, workspace.root)
    return {s.source_key: s for s in samples}


def test_one_mistyped_json_value_fails_its_row_only(tmp_path, workspace):
    # `datasets` reads a field of mixed JSON types as JSON text: without decoding, every row of it was corrupted
    img = _images(tmp_path / "img")
    path = _jsonl(tmp_path / "x.jsonl", [
        {"qid": "a", "image": img[0], "question": "What color?", "answer": "red"},
        {"qid": "b", "image": img[1], "question": "How many?", "answer": 3},
        {"qid": "c", "image": img[2], "question": ["How", "many?"], "answer": "two"},
        {"qid": "d", "image": [img[0]], "question": "What?", "answer": {"text": "x"}},
        {"qid": "e", "image": img[2], "question": "Which?", "answer": "green"},
    ])
    by_key = _ingest(path, workspace)
    assert by_key.keys() == {"a", "b", "c", "d", "e"}  # keys as written, not JSON text ('"a"')
    assert (by_key["a"].status, by_key["a"].raw_response) == ("ok", "red")
    assert (by_key["e"].status, by_key["e"].raw_response) == ("ok", "green")
    assert "Which?" in by_key["e"].instruction and '"' not in by_key["e"].instruction
    assert (by_key["b"].status, by_key["b"].raw_response) == ("ok", "3")  # a JSON number is the text it reads as
    assert by_key["c"].status == "failed" and by_key["c"].error == "question is not a string (list)"
    assert by_key["d"].status == "failed" and "answer is not a string (dict" in by_key["d"].error


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_malformed_line_fails_alone_naming_the_file_and_line(kind, tmp_path, workspace):
    img = _images(tmp_path / "img")
    if kind == "jsonl":
        good = [json.dumps({"qid": k, "image": img[i], "question": "What color?", "answer": a})
                for i, (k, a) in enumerate([("a", "red"), ("b", "blue"), ("c", "green")])]
        path = _jsonl(tmp_path / "x.jsonl", [good[0], good[1][:-1], "", good[2]])  # line 2 lacks its `}`
        reason = "x.jsonl line 2: JSON parse error"
    else:
        path = tmp_path / "x.csv"
        path.write_text(f"qid,image,question,answer\na,{img[0]},What color?,red\nb,{img[1]},How many, exactly?,two\n"
                        f"c,{img[2]},What?,green\n")
        reason = "x.csv line 3: 5 fields where the header has 4"
    results, samples, _ = fixtures.ingest_locally({"adapter": "generic", "from": str(path), "mapping": VQA},
                                                  workspace.root)
    assert [(s.source_key, s.status) for s in samples] == [("a", "ok"), ("1", "failed"), ("c", "ok")]
    assert samples[1].error.startswith(reason)
    assert (samples[0].raw_response, samples[2].raw_response) == ("red", "green")
    assert sum(r["failed"] for r in results) == 1


def test_a_json_document_with_a_syntax_error_stops_before_any_work(tmp_path, workspace):
    path = tmp_path / "x.json"
    path.write_text('[\n {"qid": "a", "question": "Q?", "answer": "x"},\n {"qid": "b" "answer": "y"}\n]\n')
    spec = SourceSpec.model_validate({"adapter": "generic", "from": str(path), "mapping": VQA})
    with pytest.raises(SourceError, match=r"x.json: JSON parse error at line 3 column 14: Expecting ','"):
        plan_source(spec, workspace.root, 100)
    assert not list(Path(workspace.root).rglob("*.parquet"))


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_an_unreadable_image_file_fails_its_sample_not_the_shard(tmp_path, workspace):
    img = _images(tmp_path / "img")
    path = _jsonl(tmp_path / "x.jsonl", [
        {"qid": "ok1", "image": img[0], "question": "What color?", "answer": "red"},
        {"qid": "mem", "image": "/proc/self/mem", "question": "What color?", "answer": "blue"},  # read() -> EIO
        {"qid": "ok2", "image": img[1], "question": "What color?", "answer": "green"},
    ])
    by_key = _ingest(path, workspace)
    assert by_key["ok1"].status == by_key["ok2"].status == "ok"
    assert by_key["mem"].status == "failed"
    assert by_key["mem"].error.startswith("bad image: cannot read image file /proc/self/mem: ")


def test_csv_fields_are_the_text_written(tmp_path, workspace):
    img = _images(tmp_path / "img")
    path = tmp_path / "x.csv"
    path.write_text(f"qid,image,question,answer\n007,{img[0]},How many?,3\nb,{img[1]},Which?,None\n"
                    f"c,{img[2]},How many?,\nd,{img[0]},Ratio?,2.50\n")
    by_key = _ingest(str(path), workspace)
    assert {k: s.raw_response for k, s in by_key.items() if s.status == "ok"} == {"007": "3", "b": "None", "d": "2.50"}
    assert by_key["c"].status == "failed" and by_key["c"].error == "annotation is empty"


def test_generic_images_and_options_take_their_values_as_written(tmp_path, workspace):
    img = _images(tmp_path / "img")
    mapping = {"task_type": "multiple_choice", "key": "qid", "images": "imgs", "instruction": "question",
               "response": "answer", "options": "opts"}
    row = {"question": "What color?", "answer": "red"}
    path = _jsonl(tmp_path / "x.jsonl", [
        row | {"qid": "list", "imgs": [img[0], img[1]], "opts": ["red", "blue"]},
        row | {"qid": "one", "imgs": img[2], "opts": ["red", 7]},  # one path, not its characters
        row | {"qid": "str_opts", "imgs": [img[0]], "opts": "red or blue"},
        row | {"qid": "no_opts", "imgs": [img[0]], "opts": None},
        row | {"qid": "null", "imgs": None, "opts": ["red"]},
        row | {"qid": "empty", "imgs": [], "opts": ["red"]},
    ])
    by_key = _ingest(path, workspace, mapping)
    assert by_key["list"].status == "ok" and len(by_key["list"].images) == 2
    assert by_key["one"].status == "ok" and len(by_key["one"].images) == 1 and "red, 7" in by_key["one"].instruction
    assert by_key["str_opts"].error == "opts is not a list (str)"
    assert by_key["no_opts"].error == "opts is missing (null)"
    assert by_key["null"].error == "bad image: imgs holds no image (null)"  # as a null `image` fails
    assert by_key["empty"].error == "bad image: imgs holds no image (empty list)"
    with pytest.raises(SourceError, match="map `options`"):
        plan_source(SourceSpec.model_validate({"adapter": "generic", "from": path, "mapping": mapping | {"options": None}}),
                    workspace.root, 100)


@pytest.mark.parametrize(("spec", "message"), [
    ({"adapter": "demo", "options": {"scnes": 5}}, r"unknown option 'scnes'; did you mean 'scenes'\?"),
    ({"adapter": "demo", "options": {"scenes": -3}}, r"scenes must be a whole number >= 1, got -3"),
    ({"adapter": "generic", "from": "x.jsonl", "mapping": VQA, "options": {"imagefolder": "/tmp"}},
     r"unknown option 'imagefolder'; did you mean 'image_folder'\?"),
    ({"adapter": "generic", "from": "x.jsonl", "mapping": VQA, "options": {"image_folder": "/nope/nowhere"}},
     r"image_folder '/nope/nowhere' is not a folder"),
    ({"adapter": "coco_captions", "options": {"box_format": "xy"}}, r"box_format must be one of"),
])  # fmt: skip
def test_bad_adapter_options_stop_before_the_workspace_is_made(spec, message, tmp_path):
    from flows.ingest import ingest_flow

    with pytest.raises(SourceError, match=message):
        ingest_flow.fn(workspace=str(tmp_path / "ws"), sources=[spec])
    assert not (tmp_path / "ws").exists()


def test_cli_names_the_mapping_file_and_suggests_the_key_meant(tmp_path):
    from polite.cli import app

    mapping = tmp_path / "m.yaml"
    mapping.write_text("task_type: vqa\nquestion: q\nanswer: a\n")
    result = CliRunner().invoke(app, ["ingest", "generic", "--from", str(tmp_path), "--mapping", str(mapping),
                                      "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    assert f"invalid --mapping {mapping}" in result.output
    assert "question: unknown key; did you mean 'instruction'?" in result.output
    assert "answer: unknown key; did you mean 'response'?" in result.output
    mapping.write_text("task_type: vqa\ninstruction: q\nresponse: a\nresponse: b\n")  # the second would win
    twice = CliRunner().invoke(app, ["ingest", "generic", "--from", str(tmp_path), "--mapping", str(mapping),
                                     "-w", str(tmp_path / "ws")], env={"COLUMNS": "300"})  # fmt: skip
    assert twice.exit_code == 2 and "key 'response' appears twice (lines 3 and 4)" in twice.output, twice.output
    typo = CliRunner().invoke(app, ["ingest", "demo", "-o", "scnes=5", "-w", str(tmp_path / "ws")])
    assert typo.exit_code == 2 and "did you mean 'scenes'?" in typo.output
    assert not (tmp_path / "ws").exists()  # checked before a flow run
