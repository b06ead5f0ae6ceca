"""The generic column-mapping adapter on parquet, json, csv and save_to_disk data, and its error messages."""

from __future__ import annotations

import json

import pytest

from polite.config import ConfigError, SourceSpec, parse_config
from tasks.ingest import plan_source
from tasks.sources import fixtures
from tasks.sources.generic import get_path, parse_path
from tasks.sources.templates import TEMPLATES, render_instruction

ROWS = {
    "qid": ["a1", "a2", "a3", "a4"],
    "meta": [{"question": "What is on the table?", "answers": [{"answer": "a cup"}]},
             {"question": "How many birds?", "answers": [{"answer": "3"}]},
             {"question": "Is it day?", "answers": [{"answer": ""}]},
             {"question": "Which room?", "answers": []}],
}


def run_source(spec, workspace, shard_size=1000):
    return fixtures.ingest_locally(spec, workspace.root, shard_size)


def _dataset():
    import datasets

    s = datasets.Value("string")
    features = datasets.Features({"qid": s, "meta": {"question": s, "answers": datasets.List({"answer": s})},
                                  "image": datasets.Image()})
    rows = ROWS | {"image": [fixtures.image(1), fixtures.image(2), fixtures.image(3), fixtures.image(4)]}
    return datasets.Dataset.from_dict(rows, features=features)


MAPPING = {"task_type": "vqa", "key": "qid", "image": "image", "instruction": "meta.question",
           "response": "meta.answers[0].answer", "meta": ["meta.question"]}


def _check(samples):
    by_key = {s.source_key: s for s in samples}
    assert by_key["a1"].raw_response == "a cup" and "what is on the table?" in by_key["a1"].instruction.lower()
    assert by_key["a1"].meta == {"meta.question": "What is on the table?"}
    assert by_key["a3"].status == "failed" and "annotation is empty" in by_key["a3"].error
    assert by_key["a4"].status == "failed" and "meta.answers[0].answer" in by_key["a4"].error
    assert [s.status for s in samples].count("ok") == 2


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "hub_folder"])
def test_generic_on_parquet_save_to_disk_and_hub_folder(kind, tmp_path, workspace):
    ds = _dataset()
    if kind == "parquet":
        target = tmp_path / "rows.parquet"
        ds.to_parquet(str(target))
    elif kind == "save_to_disk":
        target = tmp_path / "saved"
        ds.save_to_disk(str(target))
    else:
        target = tmp_path / "hub"
        (target / "data").mkdir(parents=True)
        ds.to_parquet(str(target / "data" / "train-00000-of-00001.parquet"))
    spec = {"adapter": "generic", "name": f"g_{kind}", "from": str(target), "split": "train" if kind == "hub_folder" else None,
            "mapping": MAPPING}
    _, samples, _ = run_source(spec, workspace)
    _check(samples)


def test_generic_on_json_and_csv_with_image_paths(tmp_path, workspace):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(fixtures.png(i))
    records = [{"file": f"img/{i}.png", "caption": c} for i, c in enumerate(["A red square.", "Two dots.", ""])]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "caps.csv").write_text("file,caption\n" + "\n".join(f'{r["file"]},"{r["caption"]}"' for r in records))
    mapping = {"task_type": "caption", "image": "file", "response": "caption"}
    for name in ("caps.jsonl", "caps.csv"):
        _, samples, images = run_source(
            {"adapter": "generic", "name": name.replace(".", "_"), "from": str(tmp_path / name), "mapping": mapping}, workspace
        )
        assert [s.status for s in samples] == ["ok", "ok", "failed"]
        assert samples[0].instruction.startswith("<image>") and samples[0].instruction[7:] in TEMPLATES["caption"]
        assert len(images) == 2


def test_generic_list_response_is_joined_and_verbatim_instruction(tmp_path, workspace):
    import datasets

    ds = datasets.Dataset.from_dict({"caps": [["one.", "two."]], "prompt": ["Say it <image> twice."],
                                     "image": [fixtures.image(5)]},
                                    features=datasets.Features({"caps": datasets.List(datasets.Value("string")),
                                                                "prompt": datasets.Value("string"), "image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "x.parquet"))
    mapping = {"task_type": "caption", "image": "image", "instruction": "prompt", "instruction_verbatim": True,
               "response": "caps", "response_join": " | "}
    _, samples, _ = run_source({"adapter": "generic", "from": str(tmp_path / "x.parquet"), "mapping": mapping}, workspace)
    assert samples[0].raw_response == "one. | two." and samples[0].instruction == "<image>Say it  twice."


def test_generic_missing_column_and_bad_config(tmp_path, workspace):
    _dataset().to_parquet(str(tmp_path / "rows.parquet"))
    spec = {"adapter": "generic", "from": str(tmp_path / "rows.parquet"), "mapping": MAPPING | {"response": "answer"}}
    with pytest.raises(ValueError, match=r"\['answer'\] not found; columns found: \['image', 'meta', 'qid'\]"):
        plan_source(SourceSpec.model_validate(spec), workspace.root, 100)
    with pytest.raises(ConfigError, match="needs a `mapping`"):
        parse_config({"ingest": {"sources": [{"adapter": "generic", "from": "x"}]}})
    with pytest.raises(ConfigError, match="unknown adapter 'vqa3'"):
        parse_config({"ingest": {"sources": [{"adapter": "vqa3"}]}})
    with pytest.raises(ConfigError, match="task_type 'chat'"):
        parse_config({"ingest": {"sources": [{"adapter": "generic", "mapping": {"task_type": "chat", "response": "r"}}]}})


def test_paths_and_templates_are_deterministic():
    assert parse_path("answers[0].answer") == ("answers", 0, "answer")
    assert get_path({"a": {"b": [None, {"c": 1}]}}, "a.b[1].c") == 1
    first = render_instruction("vqa", "s_1", question="Is it red?")
    assert first == render_instruction("vqa", "s_1", question="Is it red?")
    # and across processes and versions (a re-ingest must give the same instructions): pinned
    assert [render_instruction("vqa", f"s_{i}", question="Is it red?") for i in range(4)] == [
        "<image>Question about the image: Is it red?",
        "<image>Based on what you see, is it red?",
        "<image>Is it red?",
        "<image>Look at the picture and answer: Is it red?",
    ]
    wordings = {render_instruction("vqa", f"s_{i}", question="Is it red?") for i in range(40)}
    assert len(wordings) == len(TEMPLATES["vqa"])  # several paraphrases are used across ids
    assert all(w.startswith("<image>") and "red?" in w for w in wordings)


def test_hub_id_offline_fails_with_a_message(workspace):
    with pytest.raises(ValueError, match="cannot load 'lmms-lab/VQAv2'.*local copy"):
        plan_source(SourceSpec.model_validate({"adapter": "vqav2"}), workspace.root, 100)


def test_generic_empty_verbatim_instruction_fails_the_sample(tmp_path, workspace):
    records = [{"prompt": "", "caption": "A red square."}, {"prompt": " <image> ", "caption": "Two dots."},
               {"prompt": "Describe it.", "caption": "A dot."}]  # fmt: skip
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    mapping = {"task_type": "caption", "instruction": "prompt", "instruction_verbatim": True, "response": "caption"}
    _, samples, _ = run_source({"adapter": "generic", "from": str(tmp_path / "x.jsonl"), "mapping": mapping}, workspace)
    assert [s.status for s in samples] == ["failed", "failed", "ok"]
    assert all(s.error == "instruction is empty" for s in samples[:2])
    assert samples[2].instruction == "Describe it."


def test_local_state_follows_the_data_files_only(tmp_path):
    # Computed on every load (once per shard): it must not stat a folder of images or a .git beside the data.
    import os

    from tasks.sources.loading import local_state

    (tmp_path / "data").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"one")
    (tmp_path / "images" / "0.jpg").write_bytes(b"jpg")
    (tmp_path / ".git" / "index").write_bytes(b"git")
    before = local_state(str(tmp_path))
    (tmp_path / "images" / "0.jpg").write_bytes(b"another jpg")
    (tmp_path / "images" / "1.jpg").write_bytes(b"jpg")
    (tmp_path / ".git" / "index").write_bytes(b"changed")
    assert local_state(str(tmp_path)) == before
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"two!")
    os.utime(tmp_path / "data" / "train-00000-of-00001.parquet", ns=(1, 1))
    assert local_state(str(tmp_path)) != before
