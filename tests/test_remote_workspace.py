"""A workspace on fsspec storage (``memory://`` here, ``s3://`` for a cluster; docs/factory.md): ingest,
distortion and its training set, rewrite, a rerun, filter and export run on it, the lineage stores its paths relative to it, and the export carries the
very image bytes the ingest stored."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_rewrite_fixtures import tiny_model

from lineage.store import LineageStore
from polite.workspace import Workspace

pytestmark = pytest.mark.filterwarnings("ignore")


def test_every_stage_but_training_runs_on_a_remote_workspace(tmp_path, monkeypatch, prefect_harness):
    from flows.distort import distort_flow, write_training_set
    from flows.export import export_flow
    from flows.filter import filter_flow
    from flows.ingest import ingest_flow
    from flows.rewrite import rewrite_flow
    from tasks.sources import fixtures

    monkeypatch.setenv("POLITE_DB_DIR", str(tmp_path / "db"))
    ws = Workspace.resolve(f"memory://remote-{uuid.uuid4().hex[:8]}")
    built = fixtures.BUILDERS["vqav2"](tmp_path / "vqav2")
    model = tiny_model(tmp_path / "models")
    config = {
        "ingest": {"sources": [built.spec]},
        "distort": {"task_types": ["vqa"], "mix": [{"method": "augment"}]},
        "rewrite": {"preset": "greedy", "overrides": {"max_new_tokens": 8}},
        "export": {"formats": ["llava", "parquet"], "where": "rewrite_status = 'ok'", "report": "none",
                   "checks": {"min_keep_rate": 0.0}},
    }  # fmt: skip

    ingested = ingest_flow(config=config, workspace=ws.root)
    assert ingested["ok"] == built.ok and ingested["failed"] == built.failed
    distorted = distort_flow(config=config, workspace=ws.root)
    # one-word answers rarely survive augmentation ("unchanged: no step was drawn"): those pairs fail
    assert distorted["augment_selected"] == built.ok and distorted["augment_ok"] >= 1
    assert distorted["augment_ok"] + distorted["augment_failed"] == built.ok
    training = pq.read_table(write_training_set(config, ws.root, out=str(tmp_path / "training.parquet")))
    assert training.num_rows == distorted["augment_ok"]  # its images are where the workspace keeps them
    assert all(ws.fs.exists(p) for ps in training.column("images").to_pylist() for p in ps)
    rewritten = rewrite_flow(config=config, workspace=ws.root, model=model)
    assert rewritten["ok"] == rewritten["selected"] == built.ok
    rerun = rewrite_flow(config=config, workspace=ws.root, model=model, where="sample_id IN "
                         "(SELECT sample_id FROM lineage WHERE rewrite_status = 'ok' ORDER BY sample_id LIMIT 2)")
    assert rerun["ok"] == rerun["selected"] == 2
    assert rerun["recovered_files"] == 0  # the first run's result file is known as ingested, whatever its URL
    filter_flow(config=config, workspace=ws.root)
    exported = export_flow(config=config, workspace=ws.root)
    assert exported["n_items"] == built.ok

    store = LineageStore(ws.db_path)
    assert str(ws.db_path).startswith(str(tmp_path / "db"))
    stored = {r["image_id"]: r["path"] for r in store.query("SELECT image_id, path FROM images").to_pylist()}
    assert stored and all(p.startswith("images/") for p in stored.values())
    for table, column in (("exports", "path"), ("rewrite_result_files", "path"), ("samples", "shard")):
        paths = store.query(f"SELECT DISTINCT {column} AS p FROM {table}").column("p").to_pylist()
        assert paths and not any("://" in p for p in paths), (table, paths)
    assert store.query("SELECT count(*) AS n FROM rewrites WHERE reason LIKE 'rerun:%'").column("n")[0].as_py() == 2

    fs = ws.fs
    llava = exported["exports"]["llava"]["path"]
    assert llava == ws.url("exports", Path(llava).name)
    records = json.loads(fs.cat(f"{llava}/llava.json"))
    assert len(records) == built.ok
    for record in records:  # each image the export wrote is the stored image, byte for byte
        name = record["image"].removeprefix("images/")
        original = next(p for p in stored.values() if Path(p).name == name)
        assert fs.cat(f"{llava}/images/{name}") == fs.cat(ws.locate(original))
