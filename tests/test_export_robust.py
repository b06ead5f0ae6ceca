"""Export at scale and under bad input: streamed parquet shards, missing image files, whole folders or none,
the images mode in the id, the Hub push's checks, runs that reuse folders, the dataset card and LLaVA markers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_export_flow import populate

QUIET = {"export": {"report": "none"}}  # the report is tested in test_export_flow; here it is only a second


def _exports(workspace) -> list[str]:
    """Every entry under exports/ (temporary folders included): what a failed export must not leave."""
    root = Path(workspace.root, "exports")
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _image_files(store, workspace) -> list[Path]:
    paths = store.query("SELECT path FROM images ORDER BY path").column("path").to_pylist()
    return [Path(workspace.locate(p)) for p in paths]


def test_parquet_is_written_in_shards_a_batch_at_a_time_and_loads_the_same_rows(workspace, prefect_harness, monkeypatch):
    import datasets

    import tasks.export as texport
    from flows.export import export_flow

    populate(workspace)
    monkeypatch.setattr(texport, "BATCH_ROWS", 2)  # 5 items: batches of 2, 2, 1 ...
    monkeypatch.setattr(texport, "SHARD_BYTES", 1)  # ... and each batch's images fill a file
    seen = []
    real_record = texport.hf_record
    monkeypatch.setattr(texport, "hf_record", lambda row: seen.append(row["sample_id"]) or real_record(row))
    out = export_flow(config=QUIET, workspace=workspace.root, formats=["parquet", "datasets"])
    folder = Path(out["exports"]["parquet"]["path"])
    names = sorted(p.name for p in (folder / "data").iterdir())
    assert names == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    by_card = datasets.load_dataset(str(folder), split="train")  # the card's `configs: data_files`
    from_disk = datasets.load_from_disk(out["exports"]["datasets"]["path"])
    ids = ["s_coco_0", "s_coco_1", "s_coco_3", "s_gqa_0", "s_gqa_2"]
    assert by_card["id"] == from_disk["id"] == ids and by_card["split"] == ["train"] * 5
    assert by_card[4]["images"][0].size == (24, 16) and from_disk[4]["images"][0].size == (24, 16)
    assert by_card["output"] == from_disk["output"] and by_card["rewrite_id"] == from_disk["rewrite_id"]
    assert sorted(seen) == sorted(ids * 2)  # each row's images read once per format, in batches
    manifest = json.loads((folder / "_SUCCESS.json").read_text())
    assert "path" not in manifest and manifest["files"][:3] == [f"data/{n}" for n in names]  # no absolute path
    # another shard size is another folder (its files differ), not the old one taken as done
    monkeypatch.setattr(texport, "SHARD_BYTES", 10**9)
    again = export_flow(config=QUIET, workspace=workspace.root, formats=["parquet"])
    assert again["exports"]["parquet"]["export_id"] != out["exports"]["parquet"]["export_id"]
    assert [p.name for p in Path(again["exports"]["parquet"]["path"], "data").iterdir()] == [
        "train-00000-of-00001.parquet"
    ]


def test_a_missing_image_file_stops_the_export_before_anything_is_written(workspace, prefect_harness):
    from flows.export import ExportCheckFailed, export_flow

    store = populate(workspace)
    gone = _image_files(store, workspace)[1]
    gone.unlink()
    with pytest.raises(ExportCheckFailed, match=r"image files: 2 selected items reference missing image files: "
                                                r"s_coco_1 \(.*" + gone.name) as held:  # fmt: skip
        export_flow(config=QUIET, workspace=workspace.root, formats=["llava", "datasets"])
    assert "\n  - image files:" in str(held.value) and str(held.value).count("\n") == 1  # one line for it
    assert _exports(workspace) == []
    assert store.query("SELECT count(*) AS n FROM exports").column("n")[0].as_py() == 0
    # a format that does not open the images (pf1m with images: none) is not stopped by it
    none = {"export": {"report": "none", "images": "none"}}
    assert export_flow(config=none, workspace=workspace.root, formats=["pf1m"])["n_items"] == 5


def test_a_format_that_fails_half_way_leaves_no_folder_and_the_next_run_writes_it(workspace, prefect_harness, monkeypatch):
    import tasks.export as texport
    from flows.common import ShardFailures
    from flows.export import export_flow

    populate(workspace)

    def crash(rows, out_dir, mode):
        raise OSError("disk full")

    monkeypatch.setattr(texport, "place_images", crash)  # after llava.json is written
    with pytest.raises(ShardFailures, match="disk full"):
        export_flow(config=QUIET, workspace=workspace.root, formats=["llava"])
    assert _exports(workspace) == []  # neither llava-x_... nor its temporary sibling
    monkeypatch.undo()
    out = export_flow(config=QUIET, workspace=workspace.root, formats=["llava"])
    assert sorted(p.name for p in Path(out["exports"]["llava"]["path"]).iterdir()) == [
        "README.md", "_SUCCESS.json", "images", "llava.json"]  # fmt: skip


def test_the_images_mode_is_part_of_the_export_id(workspace, prefect_harness):
    from flows.export import export_flow

    populate(workspace)
    none = export_flow(config={"export": {"report": "none", "images": "none"}}, workspace=workspace.root,
                       formats=["llava", "parquet"])  # fmt: skip
    copy = export_flow(config={"export": {"report": "none", "images": "copy"}}, workspace=workspace.root,
                       formats=["llava", "parquet"])  # fmt: skip
    assert none["exports"]["llava"]["export_id"] != copy["exports"]["llava"]["export_id"]
    assert none["exports"]["parquet"]["export_id"] == copy["exports"]["parquet"]["export_id"]  # bytes embedded
    copied = Path(copy["exports"]["llava"]["path"])
    assert all((copied / r["image"]).is_file() for r in json.loads((copied / "llava.json").read_text()))
    bare = Path(none["exports"]["llava"]["path"])
    assert not (bare / "images").exists()
    # with no copies, the records name the image store's files, relative to the workspace root
    assert all(Path(workspace.root, r["image"]).is_file() for r in json.loads((bare / "llava.json").read_text()))
    assert "relative to the factory workspace's root" in (bare / "README.md").read_text()


def test_push_checks_run_before_anything_is_written(workspace, prefect_harness, monkeypatch):
    import huggingface_hub
    from typer.testing import CliRunner

    from flows.export import export_flow
    from polite.cli import app
    from tasks.export_hub import HubPushError

    store = populate(workspace)
    with pytest.raises(HubPushError, match="not a Hub repo id"):
        export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"], push_to_hub="bad repo!")
    with pytest.raises(HubPushError, match="as user/name"):
        export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"], push_to_hub="notarepo")
    cli = CliRunner().invoke(app, ["export", "-w", workspace.root, "--push-to-hub", "me/polite"])
    assert cli.exit_code == 2 and "HF_HUB_OFFLINE is set" in cli.output and "Traceback" not in cli.output
    monkeypatch.delenv("HF_HUB_OFFLINE")  # read when the push is checked, not when huggingface_hub was imported
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"], push_to_hub="me/polite")
    assert _exports(workspace) == []
    assert store.query("SELECT count(*) AS n FROM runs WHERE flow = 'export'").column("n")[0].as_py() == 0


def test_a_failed_push_is_one_line_saying_the_export_is_written(workspace, prefect_harness, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    import tasks.export_hub as export_hub
    from flows.export import export_flow
    from tasks.export_hub import HubPushError

    class OfflineHub:
        def create_repo(self, **kw):
            raise ConnectionError("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.\n"
                                  "more detail")  # fmt: skip

    class RefusingHub(OfflineHub):  # a refused connection: the HTTP library's own error, not an OSError
        def create_repo(self, **kw):
            raise HfHubHTTPError.__bases__[0]("[Errno 111] Connection refused")

    monkeypatch.setattr(export_hub, "check_hub_push", lambda repo_id: None)
    real = export_hub.push_folder_to_hub
    monkeypatch.setattr(export_hub, "push_folder_to_hub", lambda f, repo, private=True: real(f, repo, private, OfflineHub()))
    populate(workspace)
    with pytest.raises(HubPushError) as failed:
        export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"], push_to_hub="me/polite")
    message = str(failed.value)
    assert "\n" not in message and "ConnectionError: Cannot reach" in message
    folder = message.split("recorded at ")[1].split(";")[0]
    assert Path(folder, "_SUCCESS.json").is_file() and "hf upload me/polite " + folder in message
    with pytest.raises(HubPushError, match=r"failed \(\w+: \[Errno 111\] Connection refused\); the export is written"):
        real(folder, "me/polite", True, RefusingHub())


def test_a_run_that_reuses_its_folders_is_the_latest_export_for_diff(workspace, prefect_harness):
    from flows.export import export_flow
    from lineage.queries import export_diff

    store = populate(workspace)
    first = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"])
    gqa = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"], where="kept AND source = 'gqa'")
    again = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"])  # the first's folder, reused
    assert again["exports"] == first["exports"] and again["run_id"] != first["run_id"]
    report = export_diff(store)
    assert (report["a"]["ref"], report["b"]["ref"]) == (gqa["run_id"], again["run_id"])
    assert report["counts"]["added"] == 3 and report["counts"]["same"] == 2
    assert report["b"]["export_ids"] == [first["exports"]["pf1m"]["export_id"]]
    published = store.query("SELECT run_id, count(*) AS n FROM export_runs GROUP BY 1").to_pylist()
    assert {r["run_id"] for r in published} == {first["run_id"], gqa["run_id"], again["run_id"]}


def test_migration_012_backfills_export_runs_from_exports(workspace):
    from lineage.store import LineageStore

    store = LineageStore(workspace.db_path)
    store.migrate()
    with store.writer() as con:  # as a database of before 012 is: exports rows, no export_runs table
        con.execute("DROP TABLE export_runs")
        con.execute("DELETE FROM schema_migrations WHERE version = 12")
        con.execute("INSERT INTO exports (export_id, format, path, run_id, n_items) VALUES "
                    "('x_1', 'pf1m', 'e', 'run_1', 3), ('x_2', 'llava', 'e', 'run_1', 3), ('x_3', 'pf1m', 'e', NULL, 1)")  # fmt: skip
    store.migrate()
    rows = store.query("SELECT run_id, export_id FROM export_runs ORDER BY export_id").to_pylist()
    assert [(r["run_id"], r["export_id"]) for r in rows] == [("run_1", "x_1"), ("run_1", "x_2"), ("x_3", "x_3")]


def test_the_card_states_this_export_and_is_rewritten_on_a_reexport(workspace, prefect_harness, caplog):
    from flows.export import export_flow

    store = populate(workspace, rewards=False)
    out = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m", "parquet"], where="kept AND source = 'gqa'")
    pf1m = Path(out["exports"]["pf1m"]["path"], "README.md").read_text()
    parquet = Path(out["exports"]["parquet"]["path"], "README.md").read_text()
    assert "| gqa | train | 2 |" in pf1m and "| coco |" not in pf1m.split("## Factory funnel")[0]
    assert "`rewrite_id`" in parquet and "`rewrite_id`" not in pf1m  # pf1m records have no rewrite_id
    assert "`min_median_reward_gain`: skipped: no selected item has both rewards" in pf1m
    assert "adapter `None`" not in pf1m and "no adapter" in pf1m
    assert all(r["split"] == "train" for r in json.loads(Path(out["exports"]["pf1m"]["path"], "gqa.json").read_text()))
    with store.writer() as con:  # a rethreshold: same items, other thresholds
        con.execute("""UPDATE decisions SET thresholds = '{"semantic": 0.5}'""")
    again = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"], where="kept AND source = 'gqa'")
    assert again["exports"]["pf1m"] == out["exports"]["pf1m"]
    assert '{"semantic": 0.5}' in Path(out["exports"]["pf1m"]["path"], "README.md").read_text()
    with caplog.at_level(logging.WARNING):
        dropped = export_flow(config=QUIET, workspace=workspace.root, formats=["pf1m"], where="NOT kept")
    assert "selects 2 item(s) the filter chain did not keep (of 2)" in caplog.text
    card = Path(dropped["exports"]["pf1m"]["path"], "README.md").read_text()
    assert "2 of them were not kept by its filter chain" in card


def test_llava_pairs_one_image_token_with_each_image(workspace, prefect_harness):
    from flows.export import ExportCheckFailed, export_flow
    from tasks.export import llava_record

    row = {"sample_id": "s", "output": "o", "image_paths": ["/a/i_1.png", "/a/i_2.png"]}
    human = lambda rec: rec["conversations"][0]["value"]  # noqa: E731
    assert human(llava_record({**row, "instruction": "Compare these"})) == "<image>\n<image>\nCompare these"
    assert human(llava_record({**row, "instruction": "<image>A<|endofchunk|><image>B?"})) == "<image>\nA\n<image>\nB?"
    with pytest.raises(ValueError, match="s: 1 <image> marker"):
        llava_record({**row, "instruction": "<image>Q"})
    with pytest.raises(ValueError, match="1 <image> marker.* for 0 image"):
        llava_record({**row, "image_paths": [], "instruction": "<image>Q"})
    store = populate(workspace)
    with store.writer() as con:
        con.execute("UPDATE samples SET instruction = '<image><image>Two?' WHERE sample_id = 's_gqa_0'")
    with pytest.raises(ExportCheckFailed, match=r"llava: 1 selected item cannot pair <image> markers with images: "
                                                r"s_gqa_0 \(2 <image> marker\(s\) for 1 image\(s\)\)"):  # fmt: skip
        export_flow(config=QUIET, workspace=workspace.root, formats=["llava"])
    assert _exports(workspace) == []
