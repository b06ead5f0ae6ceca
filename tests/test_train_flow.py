"""`train_rewriter_flow` end to end on a real lineage database: tiny base made on the spot, one training task,
a `models` row keyed by the trained model's fingerprint, and a re-run that reuses the finished model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from lineage.store import LineageStore
from polite.shards import read_table

SETTINGS = dict(max_steps=6, batch_size=4, micro_batch_size=4, heldout_fraction=0.2, heldout_max=4, lora_rank=8,
                checkpoint_every=3, eval_every=3, time_budget_s=None, num_threads=1, tiny_vocab_size=400)  # fmt: skip


def _seed_lineage(ws, n=24):
    store = LineageStore(ws.db_path)
    store.migrate()
    rng = random.Random(0)
    with store.writer() as con:
        for c in ("red", "blue"):
            path = f"{ws.images}/{c}.png"
            Image.new("RGB", (32, 32), c).save(path)
            con.execute("INSERT INTO images (image_id, path) VALUES (?, ?)", [f"i_{c}", ws.stored(path)])
        for i in range(n):
            c = rng.choice(("red", "blue"))
            original = f"The picture shows a {c} square on a plain background."
            con.execute(
                "INSERT INTO samples (sample_id, source, split, task_type, images, instruction, raw_response, status) "
                "VALUES (?, 'demo', 'train', 'caption', ?, '<image> Describe the image.', ?, 'ok')",
                [f"s_{i}", [f"i_{c}"], original],
            )
            method = "augment" if i % 3 else "llm"
            con.execute(
                "INSERT INTO pairs (pair_id, sample_id, method, instruction, original, distorted, status) "
                "VALUES (?, ?, ?, '<image> Describe the image.', ?, ?, 'ok')",
                [f"p_{i}", f"s_{i}", method, original, original.lower()],
            )
    return store


def test_flow_trains_records_and_reuses(prefect_harness, workspace, tmp_path):
    from flows.train_rewriter import train_rewriter_flow
    from models.flamingo import FlamingoSpec
    from models.loader import fingerprint, load_rewriter

    store = _seed_lineage(workspace)
    config = {"train": SETTINGS}
    result = train_rewriter_flow(config=config, workspace=workspace.root, where="p.method = 'augment'")
    assert result["model_id"].startswith("m_") and result["steps"] == 6
    assert result["heldout_loss_end"] < result["heldout_loss_start"]
    assert result["n_pairs"] == 16  # the predicate chose the augment pairs only
    assert result["model_id"] == fingerprint(FlamingoSpec.from_file(result["path"]))
    assert result["path"].startswith(workspace.models + "/rewriter-")
    assert result["training_set"] == result["path"] + "/training_set.parquet"  # the model's own copy

    row = store.query("SELECT * FROM models").to_pylist()
    assert len(row) == 1
    row = row[0]
    assert (
        row["model_id"] == result["model_id"] and row["kind"] == "rewriter"
        and row["path"] == "models/" + Path(result["path"]).name  # relative: the workspace can move
        and row["training_set"] == row["path"] + "/training_set.parquet"
    )
    assert "p.method = 'augment'" in row["pairs_query"]
    assert row["final_loss"] == pytest.approx(result["final_loss"])
    assert row["heldout_loss_end"] == pytest.approx(result["heldout_loss_end"]) and row["n_pairs"] == 16
    params = json.loads(row["params"])
    assert params["lora_rank"] == 8 and params["train_groups"] == ["lm", "cross_attn", "perceiver"]
    base = store.query("SELECT * FROM runs WHERE run_id = ?", [row["created_by_run"]]).to_pylist()[0]
    assert base["flow"] == "train_rewriter" and base["status"] == "completed"

    # the tiny base was made in the workspace; the rewrite stage loads the model by path
    assert Path(workspace.models, "tiny-base", "flamingo.json").exists()
    loaded = load_rewriter(result["path"], device="cpu")
    assert loaded.fingerprint == result["model_id"]

    again = train_rewriter_flow(config=config, workspace=workspace.root, where="p.method = 'augment'")
    assert again["model_id"] == result["model_id"] and again["resumed_from"] is None
    assert store.query("SELECT count(*) AS n FROM models").column("n")[0].as_py() == 1
    assert (
        store.query("SELECT count(*) AS n FROM runs WHERE flow = 'train_rewriter'").column("n")[0].as_py()
        == 2
    )

    # moved whole (nothing left at the old path): the rewrite stage finds the rewriter, and its tiny base, anew
    import shutil

    from flows.rewrite import model_folder
    from polite.workspace import Workspace

    moved = Workspace.resolve(shutil.move(workspace.root, tmp_path / "moved"))
    found_row, found = model_folder(LineageStore(moved.db_path), moved, None)
    assert found_row[0] == result["model_id"] and found == f"{moved.models}/{Path(result['path']).name}"
    assert load_rewriter(found, device="cpu").fingerprint == result["model_id"]
    # and training there finds it too: its folder is named by the training set with the image paths as the
    # lineage stores them (relative), so nothing is trained again
    there = train_rewriter_flow(config=config, workspace=moved.root, where="p.method = 'augment'")
    assert there["path"] == found and there["resumed_from"] is None
    assert [p.name for p in Path(moved.models).glob("rewriter-*")] == [Path(found).name]
    kept = read_table(there["training_set"]).column("images").to_pylist()
    assert {tuple(i) for i in kept} == {("images/red.png",), ("images/blue.png",)}


def test_flow_finds_a_rewriter_named_by_absolute_image_paths(prefect_harness, workspace, monkeypatch, tmp_path):
    """A workspace trained by a version that named the folder by the training set as exported (absolute image
    paths) and kept that copy: training again returns that rewriter, where it was made and after a move."""
    import shutil

    import flows.train_rewriter as train_module

    def as_exported(ws, training_set):  # what those versions hashed and kept
        copy = Path(ws.models) / ".training_set-old.parquet"
        shutil.copyfile(training_set, copy)
        return copy

    _seed_lineage(workspace)
    config = {"train": {**SETTINGS, "max_steps": 2}}
    monkeypatch.setattr(train_module, "portable_training_set", as_exported)
    old = train_module.train_rewriter_flow(config=config, workspace=workspace.root)
    assert read_table(old["training_set"]).column("images")[0].as_py()[0].startswith(workspace.root + "/")
    monkeypatch.undo()
    again = train_module.train_rewriter_flow(config=config, workspace=workspace.root)
    assert again["path"] == old["path"] and again["model_id"] == old["model_id"] and again["resumed_from"] is None
    assert len(list(Path(workspace.models).glob("rewriter-*"))) == 1
    assert not list(Path(workspace.models).glob(".training_set-*"))  # the portable copy was dropped, not left

    from polite.workspace import Workspace

    moved = Workspace.resolve(shutil.move(workspace.root, tmp_path / "moved"))
    there = train_module.train_rewriter_flow(config=config, workspace=moved.root)
    assert there["path"] == f"{moved.models}/{Path(old['path']).name}" and there["model_id"] == old["model_id"]
    assert there["resumed_from"] is None and len(list(Path(moved.models).glob("rewriter-*"))) == 1


def test_flow_fails_before_work_on_bad_settings(prefect_harness, workspace):
    from flows.train_rewriter import train_rewriter_flow
    from polite.config import ConfigError

    with pytest.raises(ConfigError, match="train_groups"):
        train_rewriter_flow(config={"train": {"train_groups": ["everything"]}}, workspace=workspace.root)
    with pytest.raises(FileNotFoundError, match="flamingo.json"):
        train_rewriter_flow(config={}, workspace=workspace.root, base=str(workspace.models))
    _seed_lineage(workspace, n=3)
    with pytest.raises(ValueError, match=r"train.pairs_where \(--where\) \"p.methd = 'augment'\" is not a predicate"):
        train_rewriter_flow(config={"train": SETTINGS}, workspace=workspace.root, where="p.methd = 'augment'")
    assert LineageStore(workspace.db_path).query("SELECT * FROM runs WHERE flow = 'train_rewriter'").num_rows == 0
    from models.train import NoTrainingPairs
    from polite.errors import UserError

    with pytest.raises(NoTrainingPairs, match="no ok pairs") as stopped:
        train_rewriter_flow(
            config={"train": SETTINGS}, workspace=workspace.root, where="p.method = 'retrieve'"
        )
    assert isinstance(stopped.value, UserError)  # the CLI prints one line, Prefect's log no traceback


def test_a_second_training_in_one_workspace_stops_naming_the_first(prefect_harness, workspace, tmp_path):
    """Two trainings of one config share the model folder (named by pairs and settings): the second resumed
    from the first's checkpoints and both registered a model for one set of weights. It now stops at once,
    before recording a run, and `polite run` says so before its first stage."""
    import os
    import subprocess
    import sys

    from flows.train_rewriter import train_rewriter_flow
    from polite.locks import WorkspaceBusy

    _seed_lineage(workspace, n=8)
    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flows.train_rewriter import train_lock; "
         "from polite.workspace import Workspace; lock = train_lock(Workspace.resolve(sys.argv[1])); "
         "lock.__enter__(); print('held', flush=True); time.sleep(300)", workspace.root],
        cwd=repo, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match=f"a rewriter training is already running in this workspace "
                                                f"\\(pid {holder.pid} on .* UTC\\)"):  # fmt: skip
            train_rewriter_flow(config={"train": SETTINGS}, workspace=workspace.root)
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
        done = subprocess.run([str(Path(sys.executable).parent / "polite"), "run", "-w", workspace.root], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 75 and "a rewriter training is already running" in output, output
        assert "Flow run" not in output, output  # before any stage
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert LineageStore(workspace.db_path).query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]
