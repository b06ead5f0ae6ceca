"""The ingest flow end to end under a real Prefect server, with a real DuckDB file, and the CLI on top."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.ingest import ingest_flow
from lineage.store import LineageStore
from tasks.sources import fixtures


def _one(store: LineageStore, sql: str):
    return store.query(sql).to_pylist()


def test_re_ingesting_fixed_data_repairs_failed_samples_only(prefect_harness, workspace, tmp_path):
    vqa = fixtures.vqav2(tmp_path / "vqav2")
    ingest_flow(workspace=workspace.root, sources=[vqa.spec])
    store = LineageStore(workspace.db_path)
    before = {r["sample_id"]: r for r in _one(store, "SELECT sample_id, status, error, ingested_at FROM samples")}
    broken = [sid for sid, r in before.items() if r["error"] and "image" in r["error"]]
    assert len(broken) == 1
    # the source is fixed: the truncated image of question 4001 is replaced by a good one
    path = next((tmp_path / "vqav2" / "data").glob("*.parquet"))
    rows = pq.read_table(path).to_pylist()
    rows[-1]["image"] = fixtures.image(5)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    ingest_flow(workspace=workspace.root, sources=[vqa.spec])
    after = {r["sample_id"]: r for r in _one(store, "SELECT sample_id, status, error, ingested_at FROM samples")}
    assert after.keys() == before.keys()  # same ids, nothing added
    assert after[broken[0]]["status"] == "ok" and after[broken[0]]["error"] is None
    for sid, row in before.items():  # everything else is untouched, including the other failure (empty answer)
        if sid != broken[0]:
            assert after[sid] == row


def test_retry_failed_reads_again_the_shards_whose_images_were_fixed_on_disk(prefect_harness, workspace, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "good.png").write_bytes(fixtures.png(1))
    rows = [{"qid": "a", "image": "img/good.png", "answer": "red"}, {"qid": "b", "image": "img/later.png", "answer": "blue"},
            {"qid": "c", "image": "img/good.png", "answer": ""}]  # fmt: skip
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"adapter": "generic", "name": "fix", "from": str(tmp_path / "x.jsonl"),
            "mapping": {"task_type": "caption", "key": "qid", "image": "image", "response": "answer"}}
    ingest_flow(workspace=workspace.root, sources=[spec])
    store = LineageStore(workspace.db_path)
    query = "SELECT source_key, status, error, run_id, ingested_at FROM samples ORDER BY source_key"
    before = _one(store, query)
    assert [r["status"] for r in before] == ["ok", "failed", "failed"] and "not found" in before[1]["error"]
    (tmp_path / "img" / "later.png").write_bytes(fixtures.png(2))  # the data file is unchanged
    plain = ingest_flow(workspace=workspace.root, sources=[spec])
    assert plain["failed"] == 2 and _one(store, query) == before  # its shard is reused
    retried = ingest_flow(workspace=workspace.root, sources=[spec], retry_failed=True)
    after = _one(store, query)
    assert retried["failed"] == 1 and [r["status"] for r in after] == ["ok", "ok", "failed"]
    assert after[0] == before[0] and after[2] == before[2]  # the others are untouched
    assert after[1]["run_id"] == retried["run_id"]


@pytest.mark.slow
def test_flow_ingests_the_demo_and_re_ingest_adds_nothing(prefect_harness, workspace):
    config = {"ingest": {"sources": [{"adapter": "demo", "options": {"scenes": 40}}], "shard_size": 64}}
    summary = ingest_flow(config=config, workspace=workspace.root)
    assert summary["ok"] == 240 and summary["new_samples"] == 240 and summary["new_images"] == 40
    assert summary["sources"]["demo"]["shards"] == 1
    store = LineageStore(workspace.db_path)
    rows = _one(store, "SELECT split, task_type, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL")
    assert [(r["split"], r["task_type"], r["n"]) for r in rows] == [
        ("hq", "conversation", 80), ("hq", "detailed_caption", 40), ("raw", "caption", 40), ("raw", "vqa", 80)]
    ids = [r["sample_id"] for r in _one(store, "SELECT sample_id FROM samples ORDER BY 1")]
    # every sample's images are rows of `images`, and every sample knows its shard and ingest run
    assert _one(store, "SELECT count(*) AS n FROM samples s, unnest(s.images) AS u(i) "
                       "WHERE i NOT IN (SELECT image_id FROM images)")[0]["n"] == 0
    assert _one(store, "SELECT count(*) AS n FROM samples WHERE shard IS NULL OR run_id IS NULL")[0]["n"] == 0
    run = store.query("SELECT status, summary FROM runs WHERE run_id = ?", [summary["run_id"]]).to_pylist()[0]
    assert run["status"] == "completed" and json.loads(run["summary"])["ok"] == 240

    again = ingest_flow(config=config, workspace=workspace.root)
    assert again["new_samples"] == 0 and again["new_images"] == 0 and again["ok"] == 240
    assert [r["sample_id"] for r in _one(store, "SELECT sample_id FROM samples ORDER BY 1")] == ids


@pytest.mark.slow
def test_flow_records_failed_rows_and_keeps_going(prefect_harness, workspace, tmp_path):
    vqa = fixtures.vqav2(tmp_path / "vqav2")
    llava = fixtures.llava_instruct(tmp_path / "llava")
    sources = [vqa.spec, llava.spec | {"name": "llava"}]
    summary = ingest_flow(config={"ingest": {"shard_size": 2}}, workspace=workspace.root, sources=sources)
    assert summary["sources"]["vqav2"]["shards"] == 3
    assert (summary["sources"]["vqav2"]["ok"], summary["sources"]["vqav2"]["failed"]) == (vqa.ok, vqa.failed)
    assert (summary["sources"]["llava"]["ok"], summary["sources"]["llava"]["failed"]) == (llava.ok, llava.failed)
    store = LineageStore(workspace.db_path)
    failed = _one(store, "SELECT source, error FROM samples WHERE status = 'failed' ORDER BY source, error")
    assert len(failed) == vqa.failed + llava.failed and all(r["error"] for r in failed)
    assert any("truncated" in r["error"] or "cannot be decoded" in r["error"] for r in failed if r["source"] == "vqav2")
    # one images row per distinct image of an ok sample: vqav2 questions 2001 and 2002 share theirs
    assert _one(store, "SELECT count(*) AS n FROM images")[0]["n"] == 2 + 2
    run = _one(store, "SELECT config FROM runs WHERE flow = 'ingest'")[0]
    assert json.loads(run["config"])["ingest"]["sources"][1]["name"] == "llava"


@pytest.mark.slow
def test_missing_column_fails_the_flow_before_any_work(prefect_harness, workspace, tmp_path):
    import datasets

    built = fixtures.textcaps(tmp_path / "tc")
    path = next((tmp_path / "tc").rglob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    ds.remove_columns(["caption_str"]).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"\['caption_str'\] not found; columns found: .*'image_id'"):
        ingest_flow(workspace=workspace.root, sources=[built.spec])
    assert not list(Path(workspace.root).rglob("*.parquet"))
    assert not workspace.db_path.exists() or not _one(LineageStore(workspace.db_path), "SELECT * FROM runs")


@pytest.mark.slow
def test_cli_ingest_list_and_errors(prefect_harness, workspace, tmp_path):
    from polite.cli import app

    runner = CliRunner()
    helped = runner.invoke(app, ["ingest", "--help"])
    assert helped.exit_code == 0 and "polite ingest demo" in helped.output and "--from" in helped.output
    listing = runner.invoke(app, ["ingest", "--list"])
    assert listing.exit_code == 0 and "llava_instruct" in listing.output and "coco_captions" in listing.output
    built = fixtures.flickr30k(tmp_path / "f")
    result = runner.invoke(app, ["ingest", "flickr30k", "--from", built.spec["from"], "--name", "flickr",
                                 "--workspace", workspace.root])
    assert result.exit_code == 0, result.output
    assert "what landed" in result.output and "flickr" in result.output and "failed sample(s)" in result.output
    bad = runner.invoke(app, ["ingest", "okvqa", "--from", built.spec["from"], "--split", "test", "-w", workspace.root])
    assert bad.exit_code == 2 and "not found; columns found" in bad.output
    unknown = runner.invoke(app, ["ingest", "nope", "-w", workspace.root])
    assert unknown.exit_code == 2 and "unknown adapter 'nope'" in unknown.output


def test_two_sources_with_one_label_fail_before_any_source_is_opened(workspace, tmp_path):
    from polite.config import ConfigError

    sources = [{"adapter": "demo", "options": {"scenes": 3}}, {"adapter": "vqav2", "name": "demo", "from": str(tmp_path / "nope")}]
    with pytest.raises(ConfigError, match="share a label"):
        ingest_flow.fn(workspace=workspace.root, sources=sources)
    assert not list(Path(workspace.root).rglob("*.parquet"))  # the demo was not generated


def _repeated_keys(folder: Path) -> dict:
    """A generic text-only source whose key `qid` repeats: k1 at rows 0 and 3 (another shard at shard_size 2),
    k2 at rows 1 and 2 (one shard, the repeat failed: empty answer)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "qid": ["k1", "k2", "k2", "k1", "k3"],
        "question": ["What is it?", "How many?", "How many now?", "What is it now?", "Where?"],
        "answer": ["first k1", "first k2", "", "second k1", "only k3"],
    }), folder / "data.parquet")
    return {"adapter": "generic", "name": "rep", "from": str(folder / "data.parquet"), "split": "train",
            "mapping": {"task_type": "vqa", "key": "qid", "instruction": "question", "response": "answer"}}


def _samples(store: LineageStore) -> list[dict]:
    return _one(store, "SELECT sample_id, source_key, raw_response, status, error, duplicate_of, source_row "
                       "FROM samples ORDER BY source_row, sample_id")


def test_repeated_keys_keep_the_first_occurrence_and_are_counted(prefect_harness, workspace, tmp_path):
    from polite.ids import sample_id

    spec = _repeated_keys(tmp_path / "rep")
    summary = ingest_flow(config={"ingest": {"shard_size": 2}}, workspace=workspace.root, sources=[spec])
    k1, k2, k3 = (sample_id("rep", "train", k) for k in ("k1", "k2", "k3"))
    counts = summary["sources"]["rep"]
    assert (counts["ok"], counts["failed"], counts["duplicates"]) == (3, 0, 2)
    assert counts["duplicate_ids"] == sorted([k1, k2]) and summary["new_samples"] == 3
    store = LineageStore(workspace.db_path)
    rows = _samples(store)
    kept = {r["sample_id"]: r for r in rows if r["duplicate_of"] is None}
    assert {k: r["raw_response"] for k, r in kept.items()} == {k1: "first k1", k2: "first k2", k3: "only k3"}
    assert all(r["status"] == "ok" for r in kept.values())
    dups = [r for r in rows if r["duplicate_of"] is not None]  # the later rows: failed, with a reason, traceable
    assert [(r["source_row"], r["duplicate_of"], r["status"]) for r in dups] == [(2, k2, "failed"), (3, k1, "failed")]
    assert "duplicate key 'k1'" in dups[1]["error"] and "row 3 repeats row 0" in dups[1]["error"]
    assert dups[1]["raw_response"] == "second k1"  # what was dropped stays visible

    again = ingest_flow(config={"ingest": {"shard_size": 2}}, workspace=workspace.root, sources=[spec])
    assert again["new_samples"] == 0 and again["sources"]["rep"]["duplicates"] == 2 and again["ok"] == 3
    assert _samples(store) == rows


def test_repeated_keys_resolve_the_same_whatever_order_shards_land_in(workspace, tmp_path):
    from flows.ingest import LineageBatcher

    spec = _repeated_keys(tmp_path / "rep")
    results, _, _ = fixtures.ingest_locally(spec, workspace.root, shard_size=1)  # one shard per row
    tables = []
    for name, order in (("forward", results), ("backward", results[::-1])):
        store = LineageStore(Path(workspace.root) / f"{name}.duckdb")
        store.migrate()
        counts = {"rep": dict.fromkeys(("ok", "failed", "skipped", "duplicates", "new_samples", "new_images"), 0)}
        batcher = LineageBatcher(store, f"run_{name}", counts)
        for result in order:  # each shard in its own writer session, as when shards finish seconds apart
            batcher.add(result)
            batcher.flush()
        assert (counts["rep"]["ok"], counts["rep"]["failed"], counts["rep"]["duplicates"]) == (3, 0, 2), name
        assert counts["rep"]["new_samples"] == 3, name
        tables.append(_samples(store))
    assert tables[0] == tables[1]
    assert {r["source_key"]: r["raw_response"] for r in tables[0] if r["duplicate_of"] is None} == {
        "k1": "first k1", "k2": "first k2", "k3": "only k3"}
