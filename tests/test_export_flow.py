"""Export on a lineage fixture: formats, ids, idempotence, export_items, publishing gates, report, card."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from lineage.store import LineageStore
from polite.images import ImageStore
from polite.record import Sample, samples_to_table

CAPTIONS = ["a dog on a couch", "two cats", "a red bus"]


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def populate(ws, rewards: bool = True) -> LineageStore:
    """A small finished factory in lineage form: 2 sources, 9 samples, retries, scores and decisions.

    coco (captions): 4 samples, one rewrite left unchanged (dropped), one with CLIPScore paragraphs.
    gqa (VQA): 5 samples, one failed at ingest, one failed then retried, one contradicted by NLI (dropped).
    Kept: coco 0, 1, 3 and gqa 0, 2 -> 5 items.
    """
    store = LineageStore(ws.db_path)
    store.migrate()
    images = ImageStore(ws.images)
    stored = [images.put(_png(c)) for c in [(200, 30, 30), (30, 200, 30), (30, 30, 200)]]
    # as the ingest stores them: relative to the workspace (the legacy absolute form: test_lineage_store)
    store.ingest_arrow("images", pa.Table.from_pylist([s.to_row() | {"path": ws.stored(s.path)} for s in stored]))
    samples = []
    for i in range(4):
        samples.append(
            Sample(
                sample_id=f"s_coco_{i}",
                source="coco",
                split="train",
                task_type="caption",
                instruction="<image><|endofchunk|>Describe the image.",
                raw_response=CAPTIONS[i % 3],
                images=[stored[i % 3].image_id],
            )
        )
    for i in range(5):
        samples.append(
            Sample(
                sample_id=f"s_gqa_{i}",
                source="gqa",
                split="train",
                task_type="vqa",
                instruction="<image><|endofchunk|>What colour is it?",
                raw_response="red",
                images=[stored[(i + 1) % 3].image_id],
                status="failed" if i == 4 else "ok",
                error="bad image" if i == 4 else None,
            )
        )
    store.ingest_arrow("samples", samples_to_table(samples))

    def rw(sid, attempt, status, output, at):
        return {
            "rewrite_id": f"r_{sid}_{attempt}",
            "sample_id": sid,
            "model_id": "m_tiny",
            "prompt_version": "v1",
            "settings_hash": "h1",
            "settings": json.dumps({"num_beams": 1}),
            "attempt": attempt,
            "status": status,
            "output": output,
            "error": None if status == "ok" else "OOM",
            "run_id": "run_x",
            "created_at": at,
        }

    import datetime as dt

    t0 = dt.datetime(2026, 1, 1)
    rewrites = [
        rw(
            f"s_coco_{i}",
            1,
            "ok",
            f"The image shows {CAPTIONS[i % 3]}, seen clearly." if i != 2 else CAPTIONS[2],
            t0,
        )
        for i in range(4)
    ]
    rewrites[0]["output"] += "\n\nA second paragraph about nothing in the image."
    rewrites += [
        rw("s_gqa_0", 1, "ok", "The object is red.", t0),
        rw("s_gqa_1", 1, "ok", "It is blue.", t0),
        rw("s_gqa_2", 1, "failed", None, t0),
        rw("s_gqa_2", 2, "ok", "The colour is red.", t0 + dt.timedelta(1)),
        rw("s_gqa_3", 1, "failed", None, t0),
    ]
    store.ingest_arrow("rewrites", pa.Table.from_pylist(rewrites))

    scores, decisions = [], []

    def score(rid, scorer, value, passed, details=None):
        scores.append(
            {
                "rewrite_id": rid,
                "scorer": scorer,
                "scorer_version": "1",
                "score": value,
                "passed": passed,
                "details": json.dumps(details) if details else None,
            }
        )

    kept = {"r_s_coco_0_1", "r_s_coco_1_1", "r_s_coco_3_1", "r_s_gqa_0_1", "r_s_gqa_2_2"}
    for r in rewrites:
        if r["status"] != "ok":
            continue
        rid = r["rewrite_id"]
        score(rid, "length", len(r["output"].split()), True)
        score(rid, "unchanged", 0.0 if rid != "r_s_coco_2_1" else 1.0, rid != "r_s_coco_2_1")
        if "coco" in rid:
            score(rid, "semantic", 0.8, True)
        else:
            score(rid, "nli", 0.9 if rid != "r_s_gqa_1_1" else 0.1, rid != "r_s_gqa_1_1")
        if rid == "r_s_coco_0_1":
            score(rid, "clipscore", 21.0, True, {"paragraph_scores": [21.0, 12.5]})
        if rid == "r_s_coco_1_1":
            score(rid, "rouge", 0.42, True)
        if rewards:
            score(rid, "reward", 1.0, None)
            score(rid, "reward_raw", -2.0, None)
        decisions.append(
            {
                "decision_id": "d_" + rid,
                "rewrite_id": rid,
                "kept": rid in kept,
                "reason": "kept" if rid in kept else "dropped",
                "final_output": r["output"].split("\n\n")[0] if rid == "r_s_coco_0_1" else None,
                "thresholds": json.dumps({"semantic": 0.4}),
                "run_id": "run_f",
            }
        )
    store.ingest_arrow("scores", pa.Table.from_pylist(scores))
    store.ingest_arrow("decisions", pa.Table.from_pylist(decisions))
    return store


def _tree(folder: str) -> dict[str, bytes]:
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_writes_every_format_and_records_items(workspace, prefect_harness):
    from flows.export import export_flow

    store = populate(workspace)
    out = export_flow(workspace=workspace.root, formats=["pf1m", "llava", "parquet", "datasets"])
    assert out["n_items"] == 5
    assert set(out["exports"]) == {"pf1m", "llava", "parquet", "datasets"}

    pf1m = out["exports"]["pf1m"]["path"]
    coco = json.loads(Path(pf1m, "coco.json").read_text())
    gqa = json.loads(Path(pf1m, "gqa.json").read_text())
    assert [r["id"] for r in coco] == ["s_coco_0", "s_coco_1", "s_coco_3"]
    assert [r["id"] for r in gqa] == ["s_gqa_0", "s_gqa_2"]
    first = coco[0]
    from tasks.export import PF1M_FIELDS

    assert set(PF1M_FIELDS) == {
        "input",
        "output",
        "original",
        "reward",
        "rouge_score",
        "nli_similarity",
        "sts_similarity",
        "filtered_paragraphs",
        "paragraph_clip_scores",
    }  # METHOD.md
    assert set(PF1M_FIELDS) <= set(first)
    assert first["sts_similarity"] == 0.8 and first["nli_similarity"] is None and first["rouge_score"] is None
    assert first["paragraph_clip_scores"] == [21.0, 12.5]
    assert first["filtered_paragraphs"] == ["A second paragraph about nothing in the image."]
    assert first["output"] == "The image shows a dog on a couch, seen clearly."  # the decision's final output
    assert coco[1]["paragraph_clip_scores"] is None and coco[1]["rouge_score"] == 0.42  # the rouge scorer's
    assert gqa[1]["output"] == "The colour is red."  # the retried attempt, not the failed one
    assert gqa[0]["nli_similarity"] == 0.9 and gqa[0]["sts_similarity"] is None
    for rec in coco + gqa:  # every referenced image is in the export folder
        assert all(Path(pf1m, p).is_file() for p in rec["images"])

    llava = json.loads(Path(out["exports"]["llava"]["path"], "llava.json").read_text())
    assert llava[0]["conversations"][0] == {"from": "human", "value": "<image>\nDescribe the image."}
    assert (
        llava[0]["conversations"][1]["from"] == "gpt"
        and Path(out["exports"]["llava"]["path"], llava[0]["image"]).is_file()
    )

    import datasets

    ds = datasets.load_from_disk(out["exports"]["datasets"]["path"])
    assert ds.num_rows == 5 and ds[0]["images"][0].size == (24, 16)
    pq = datasets.Dataset.from_parquet(
        str(Path(out["exports"]["parquet"]["path"], "data/train-00000-of-00001.parquet"))
    )
    assert pq.num_rows == 5 and pq.features["images"].feature.__class__.__name__ == "Image"
    card = Path(out["exports"]["parquet"]["path"], "README.md").read_text()
    assert "| coco | train | 3 |" in card and "kept" in card and "m_tiny" in card and '{"semantic": 0.4}' in card

    items = store.query(
        "SELECT export_id, sample_id, rewrite_id FROM export_items ORDER BY export_id, sample_id"
    )
    assert items.num_rows == 20
    assert ("s_gqa_2", "r_s_gqa_2_2") in {(r["sample_id"], r["rewrite_id"]) for r in items.to_pylist()}
    lineage = store.query("SELECT count(*) AS n FROM lineage WHERE export_id IS NOT NULL")
    assert lineage.column("n")[0].as_py() == 5

    report = Path(out["report"])
    assert report.is_file() and (report.parent / "funnel.png").stat().st_size > 1000
    text = report.read_text()
    assert (
        "| passed unchanged | 6 | -1 |" in text and "| passed nli | 5 | -1 |" in text and "card-0.png" in text
    )

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the report is mirrored into Prefect artifacts
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["polite-funnel", "polite-report"]))
        )
    kinds = {a.key: a.type for a in arts}
    assert kinds == {"polite-funnel": "table", "polite-report": "markdown"}


def test_an_empty_selection_exports_empty_files_in_every_format(workspace, prefect_harness):
    """`export.checks.min_items: 0` allows an empty export: every format is written, none crashes."""
    import datasets
    import pyarrow.parquet as pq

    from flows.export import export_flow

    populate(workspace)
    config = {"export": {"checks": {"min_items": 0}}}
    out = export_flow(
        config=config,
        workspace=workspace.root,
        formats=["pf1m", "llava", "parquet", "datasets"],
        where="kept AND source = 'none'",
    )
    assert out["n_items"] == 0 and {e["n_items"] for e in out["exports"].values()} == {0}
    assert json.loads(Path(out["exports"]["llava"]["path"], "llava.json").read_text()) == []
    assert datasets.load_from_disk(out["exports"]["datasets"]["path"]).num_rows == 0
    table = pq.read_table(Path(out["exports"]["parquet"]["path"], "data/train-00000-of-00001.parquet"))
    assert table.num_rows == 0 and "paragraph_clip_scores" in table.column_names


def test_report_funnel_follows_the_latest_decisions_after_a_rethreshold(workspace):
    """`scores.passed` is the verdict when a score was computed; after `--rethreshold` the decisions say who
    dropped what, and the funnel's per-scorer steps must add up to the kept count."""
    from tasks.report import funnel

    store = populate(workspace)
    with store.writer() as con:
        # a looser NLI threshold now keeps gqa_1 (its stored score still says passed = false) ...
        con.execute("UPDATE decisions SET kept = true, reason = 'kept' WHERE rewrite_id = 'r_s_gqa_1_1'")
        # ... and a stricter semantic threshold drops coco_1 (its stored score still says passed = true)
        con.execute(
            "UPDATE decisions SET kept = false, reason = 'dropped: semantic 0.80 < 0.90', dropped_by = 'semantic' "
            "WHERE rewrite_id = 'r_s_coco_1_1'"
        )
    steps = {s["step"]: s for s in funnel(store)}
    assert steps["passed unchanged"]["note"] == "-1"  # legacy decision without dropped_by: from the scores
    assert steps["passed semantic"]["note"] == "-1" and steps["passed nli"]["note"] == "-0"
    assert steps["passed nli"]["count"] == steps["kept"]["count"] == 5
    assert "passed rouge" not in steps  # scored (coco_1), but a reference figure while it drops nothing
    with store.writer() as con:  # rouge with a min_score drops gqa_0
        con.execute("UPDATE decisions SET kept = false, reason = 'dropped: rouge 0.10 < 0.20', dropped_by = 'rouge' "
                    "WHERE rewrite_id = 'r_s_gqa_0_1'")  # fmt: skip
    steps = {s["step"]: s for s in funnel(store)}
    assert list(steps)[3] == "passed rouge" and steps["passed rouge"]["note"] == "-1"  # first in the chain
    assert steps["passed nli"]["count"] == steps["kept"]["count"] == 4


def test_exporting_twice_gives_the_same_export_and_files(workspace, prefect_harness):
    from flows.export import export_flow

    store = populate(workspace)
    config = {"export": {"report": "none"}}  # the report (its own folder, tested above) is a second a run here
    first = export_flow(config=config, workspace=workspace.root, formats=["pf1m"])
    folder = first["exports"]["pf1m"]["path"]
    before = _tree(folder)
    second = export_flow(config=config, workspace=workspace.root, formats=["pf1m"])
    assert second["exports"] == first["exports"]
    assert _tree(folder) == before
    assert store.query("SELECT count(*) AS n FROM exports").column("n")[0].as_py() == 1
    # rebuilding the files from scratch gives the same bytes
    import shutil

    shutil.rmtree(folder)
    export_flow(config=config, workspace=workspace.root, formats=["pf1m"])
    assert _tree(folder) == before
    # a different selection is a different export
    other = export_flow(config=config, workspace=workspace.root, formats=["pf1m"], where="kept AND source = 'gqa'")
    assert (
        other["n_items"] == 2
        and other["exports"]["pf1m"]["export_id"] != first["exports"]["pf1m"]["export_id"]
    )


def test_a_copied_workspace_exports_into_its_own_folder(workspace, prefect_harness, tmp_path):
    """A finished export's `_SUCCESS.json` names the folder it was written to; in a copy of the workspace the same
    export is found done in the copy's folder, and recorded there (it used to stop with StopIteration)."""
    import shutil

    from flows.export import export_flow
    from lineage.store import LineageStore
    from polite.workspace import Workspace

    populate(workspace)
    config = {"export": {"report": "none"}}  # the export folders are the subject here, not the report
    first = export_flow(config=config, workspace=workspace.root, formats=["pf1m", "parquet"])
    copy = shutil.copytree(workspace.root, tmp_path / "copy")
    again = export_flow(config=config, workspace=str(copy), formats=["pf1m", "parquet"])
    for fmt in ("pf1m", "parquet"):
        assert again["exports"][fmt]["export_id"] == first["exports"][fmt]["export_id"]
        assert again["exports"][fmt]["path"] == first["exports"][fmt]["path"].replace(str(workspace.root), str(copy))
        assert _tree(again["exports"][fmt]["path"]) == _tree(first["exports"][fmt]["path"])
    paths = LineageStore(Workspace.resolve(str(copy)).db_path).query("SELECT format, path FROM exports").to_pylist()
    assert {r["format"]: r["path"] for r in paths} == {f: f"exports/{f}-{e['export_id']}" for f, e in again["exports"].items()}


def test_a_moved_workspace_reads_its_images_and_exports_where_they_are_now(workspace, prefect_harness, tmp_path):
    """Paths inside the workspace are stored relative to it: after a move (nothing left at the old path), a new
    export reads the images from the new place and the report draws them, and the old exports are found done."""
    import shutil

    from flows.export import export_flow

    populate(workspace)
    config = {"export": {"report": "markdown"}}
    first = export_flow(config=config, workspace=workspace.root, formats=["pf1m"])
    moved = Path(shutil.move(workspace.root, tmp_path / "moved"))
    assert not Path(workspace.root).exists()
    again = export_flow(config=config, workspace=str(moved), formats=["pf1m", "llava"])
    assert again["exports"]["pf1m"]["export_id"] == first["exports"]["pf1m"]["export_id"]
    llava = Path(again["exports"]["llava"]["path"])
    assert llava.parent == moved / "exports"
    pictures = sorted(p.name for p in (llava / "images").iterdir())
    assert len(pictures) == 2  # the 5 kept samples show 2 of the 3 images
    assert all((llava / "images" / p).stat().st_size > 0 for p in pictures)
    report = Path(again["report"])
    assert report.is_relative_to(moved) and len(list(report.parent.glob("card-*.png"))) > 0
    assert not any(str(workspace.root) in p.read_text(errors="ignore") for p in llava.rglob("*.json"))


def test_a_failing_gate_stops_the_export_and_names_the_check(workspace, prefect_harness):
    from flows.export import ExportCheckFailed, export_flow

    store = populate(workspace)
    config = {"export": {"checks": {"min_keep_rate": 0.9}}}
    with pytest.raises(ExportCheckFailed, match="keep_rate: 5 of 7") as held:
        export_flow(config=config, workspace=workspace.root, formats=["pf1m"])
    assert (
        Path(str(held.value).rsplit("report: ", 1)[1]).with_name("funnel.png").is_file()
    )  # the why, as a report
    with store.writer() as con:  # rewards that got worse fail the reward gate
        con.execute("UPDATE scores SET score = -3 WHERE scorer = 'reward'")
    quiet = {"report": "none"}  # the held report was checked above: the next gates need not draw it again
    with pytest.raises(ExportCheckFailed, match="median_reward_gain"):
        export_flow(config={"export": quiet}, workspace=workspace.root, formats=["pf1m"])
    with store.writer() as con:
        con.execute("UPDATE rewrites SET output = '  ' WHERE rewrite_id = 'r_s_gqa_0_1'")
    with pytest.raises(ExportCheckFailed, match="no_empty_outputs: 1"):
        export_flow(config={"export": {**quiet, "checks": {"min_median_reward_gain": None}}}, workspace=workspace.root)
    assert store.query("SELECT count(*) AS n FROM exports").column("n")[0].as_py() == 0
    failed = store.query("SELECT status FROM runs WHERE flow = 'export'").column("status").to_pylist()
    assert failed == ["failed"] * 3


def test_an_image_without_its_images_row_stops_the_export_and_names_it(workspace, prefect_harness):
    """A sample whose image id has no `images` row is not exported without that image (it was silently
    dropped by an inner join): the `images` check names the sample and the image, and nothing is written."""
    from flows.export import ExportCheckFailed, export_flow

    store = populate(workspace)
    with store.writer() as con:  # s_coco_3 gets a second image whose row is gone (lost, or never ingested)
        con.execute("UPDATE samples SET images = list_append(images, 'i_gone') WHERE sample_id = 's_coco_3'")
    config = {"export": {"report": "none"}}  # the check and the files are the subject, not the report
    with pytest.raises(ExportCheckFailed, match=r"images: 1 selected item .* s_coco_3 \(i_gone\)"):
        export_flow(config=config, workspace=workspace.root, formats=["pf1m"])
    assert store.query("SELECT count(*) AS n FROM exports").column("n")[0].as_py() == 0
    assert not list(Path(workspace.root, "exports").glob("pf1m-*"))
    # leaving it out (or re-ingesting its image) exports the rest, each with every image it has
    out = export_flow(config=config, workspace=workspace.root, formats=["pf1m"], where="kept AND sample_id <> 's_coco_3'")
    coco = json.loads(Path(out["exports"]["pf1m"]["path"], "coco.json").read_text())
    assert [r["id"] for r in coco] == ["s_coco_0", "s_coco_1"] and all(len(r["images"]) == 1 for r in coco)


def test_where_is_read_only(workspace, prefect_harness):
    from flows.export import selection_sql
    from lineage.store import ReadOnlyQueryError

    with pytest.raises(ReadOnlyQueryError):
        selection_sql("kept); DELETE FROM samples; SELECT (1")


def test_a_bad_where_stops_the_export_before_any_work(workspace, prefect_harness):
    from typer.testing import CliRunner

    from flows.export import export_flow
    from lineage.store import PredicateError
    from polite.cli import app

    store = populate(workspace)
    with pytest.raises(PredicateError, match="export.where"):
        export_flow(config={}, workspace=workspace.root, where="kept AND sorce = 'gqa'")
    bad = CliRunner().invoke(
        app, ["export", "-w", workspace.root, "--where", "kept); DELETE FROM samples; SELECT (1"]
    )
    # refused as a predicate that escapes the command's parentheses (lineage/store.py check_predicate)
    assert bad.exit_code == 2 and "closes a parenthesis it did not open" in bad.output
    assert store.query("SELECT * FROM runs WHERE flow = 'export'").num_rows == 0
    assert store.query("SELECT * FROM samples").num_rows > 0


def test_push_uploads_the_folder_with_its_card(workspace, prefect_harness, monkeypatch):
    """The Hub client's two calls, against a local fake (no network here)."""
    import tasks.export_hub as export_hub
    from flows.export import export_flow

    calls = []

    class FakeHub:
        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw, sorted(p.name for p in Path(kw["folder_path"]).rglob("*"))))

    real = export_hub.push_folder_to_hub
    monkeypatch.setattr(export_hub, "check_hub_push", lambda repo_id: None)  # offline here, and no token
    monkeypatch.setattr(
        export_hub,
        "push_folder_to_hub",
        lambda folder, repo, private=True: real(folder, repo, private, FakeHub()),
    )
    populate(workspace, rewards=False)
    out = export_flow(
        config={"export": {"report": "html"}},
        workspace=workspace.root,
        formats=["pf1m"],
        push_to_hub="me/polite",
    )
    assert out["hub_url"] == "https://huggingface.co/datasets/me/polite"
    assert (
        out["report"].endswith("report.html") and "<img src='funnel.png'>" in Path(out["report"]).read_text()
    )
    assert calls[0] == (
        "create_repo",
        {"repo_id": "me/polite", "repo_type": "dataset", "private": True, "exist_ok": True},
    )
    assert (
        calls[1][1]["repo_id"] == "me/polite"
        and "README.md" in calls[1][2]
        and "train-00000-of-00001.parquet" in calls[1][2]
    )
    assert "path: data/train-*.parquet" in Path(out["exports"]["parquet"]["path"], "README.md").read_text()
    # the pf1m folder has no parquet files: its card must not point `load_dataset` at any
    assert "data_files" not in Path(out["exports"]["pf1m"]["path"], "README.md").read_text()


def test_polite_export_command(workspace, prefect_harness):
    from typer.testing import CliRunner

    from polite.cli import app

    store = populate(workspace)
    ok = CliRunner().invoke(app, ["export", "-w", workspace.root, "--format", "llava"])
    assert ok.exit_code == 0, ok.output
    assert "exported 5 items" in ok.output
    assert store.query("SELECT format, n_items FROM exports").to_pylist() == [
        {"format": "llava", "n_items": 5}
    ]
    held = CliRunner().invoke(app, ["export", "-w", workspace.root, "--where", "kept AND source = 'none'"])
    assert held.exit_code == 2 and "min_items: 0 items to export" in held.output  # a red line, not a traceback
