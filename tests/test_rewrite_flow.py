"""The rewrite flow on a real DuckDB lineage and real Prefect: selection, a poisoned sample, --retry-failed,
rerun --where (through the CLI), and a SIGKILL in the middle of a multi-shard run followed by a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import torch
import yaml
from test_rewrite_fixtures import (
    FAST_REWRITE,
    hold_rewrite_lock,
    make_samples,
    png,
    register_model,
    tiny_model,
)

from lineage.store import LineageStore
from polite.images import ImageStore
from polite.record import Sample, samples_to_table
from polite.workspace import Workspace

pytestmark = pytest.mark.filterwarnings("ignore")
torch.set_num_threads(1)  # see tests/test_rewrite_fast.py


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def _rows(ws, sql: str, params=None) -> list[dict]:
    return LineageStore(ws.db_path).query(sql, params).to_pylist()


def _config(**rewrite) -> dict:
    return {"rewrite": {**FAST_REWRITE, **rewrite}}


def test_poisoned_sample_fails_alone_and_retry_failed_redoes_only_it(prefect_harness, workspace, model_path):
    from flows.rewrite import rewrite_flow

    samples = make_samples(workspace, n=8)
    register_model(workspace, model_path)
    stored, good_bytes = _add_poisoned_sample(workspace)

    first = rewrite_flow(config=_config(shard_size=3), workspace=workspace.root)
    raw = [s.sample_id for s in samples if s.task_type != "detailed_caption"]
    assert first["selected"] == len(raw) + 1  # the high-quality detailed captions are not rewritten
    assert (first["ok"], first["failed"], first["shards"]) == (len(raw), 1, 3)
    rows = _rows(workspace, "SELECT * FROM rewrites ORDER BY sample_id")
    assert {r["sample_id"] for r in rows} == {*raw, "s_poison"}
    bad = next(r for r in rows if r["sample_id"] == "s_poison")
    assert bad["status"] == "failed" and "cannot be decoded" in bad["error"] and bad["output"] is None
    for r in rows:
        if r["status"] == "ok":
            assert r["reason"] == "first" and r["attempt"] == 1 and r["error"] is None
            assert r["input_tokens"] > 20 and 1 <= r["output_tokens"] <= 12 and r["latency_ms"] > 0
            assert r["prompt_version"] == "pf-v1" and '"max_new_tokens": 12' in r["settings"]

    again = rewrite_flow(config=_config(shard_size=3), workspace=workspace.root)
    assert again["selected"] == 0  # resume is a query: nothing left, and a failure is not retried by default

    Path(stored.path).write_bytes(good_bytes)  # the image is fixed
    # the retry runs with the layers compiled and a growing cache: runtime options, so the same key (model,
    # prompt, settings)
    retried = rewrite_flow(config=_config(shard_size=3, compile_layers=True, cache_new_tokens=4),
                           workspace=workspace.root, retry_failed=True)  # fmt: skip
    assert (retried["mode"], retried["selected"], retried["ok"], retried["failed"]) == (
        "retry-failed",
        1,
        1,
        0,
    )
    after = _rows(workspace, "SELECT * FROM rewrites ORDER BY sample_id, attempt")
    assert len(after) == len(rows) + 1
    new = [r for r in after if r["sample_id"] == "s_poison" and r["attempt"] == 2]
    assert new and new[0]["status"] == "ok" and new[0]["reason"] == "retry-failed"
    assert json.loads(new[0]["settings"])["runtime"]["compile_layers"] is True
    assert json.loads(rows[0]["settings"])["runtime"]["compile_layers"] is False
    assert json.loads(new[0]["settings"])["runtime"]["cache_new_tokens"] == 4
    assert json.loads(rows[0]["settings"])["runtime"]["cache_new_tokens"] == 256  # the default
    assert json.loads(rows[0]["settings"])["runtime"]["kv_block"] == 16  # the default since session 13
    untouched = {r["rewrite_id"]: r for r in rows}
    for r in after:
        if r["rewrite_id"] in untouched:
            assert r == untouched[r["rewrite_id"]]
    view = _rows(workspace, "SELECT rewrite_status, attempt FROM lineage WHERE sample_id = 's_poison'")
    assert view == [{"rewrite_status": "ok", "attempt": 2}]


@pytest.mark.parametrize("preset", ["greedy", "beam"])
def test_continuous_scheduling_gives_the_static_rewrites(prefect_harness, workspace, model_path, preset):
    """Samples refilled as others finish (models/continuous.py; for beams, num_beams rows each) write the same
    rewrites as static batches; a bad image still fails alone."""
    from flows.rewrite import rewrite_flow

    make_samples(workspace, n=10)
    register_model(workspace, model_path)
    _add_poisoned_sample(workspace)
    # 3 samples at once, so the rows of a 6-sample shard are refilled as they finish
    cfg = dict(shard_size=6, max_batch_size=3, preset=preset, overrides={"max_new_tokens": 16})
    continuous = rewrite_flow(config=_config(scheduling="continuous", **cfg), workspace=workspace.root)
    assert (continuous["ok"], continuous["failed"]) == (continuous["selected"] - 1, 1)
    first = {r["sample_id"]: r for r in _rows(workspace, "SELECT * FROM rewrites")}
    assert "cannot be decoded" in first["s_poison"]["error"]
    ok = [r for r in first.values() if r["status"] == "ok"]
    assert all('"scheduling": "continuous"' in r["settings"] and r["latency_ms"] > 0 for r in ok)
    assert continuous["selected"] > 2 * 3  # more samples per shard than rows: freed rows were refilled

    chosen = ", ".join(f"'{r['sample_id']}'" for r in ok)
    static = rewrite_flow(config=_config(scheduling="static", **cfg), workspace=workspace.root,
                          where=f"sample_id IN ({chosen})")  # fmt: skip
    assert static["ok"] == len(ok)
    redone = _rows(workspace, "SELECT * FROM rewrites WHERE attempt = 2")
    assert all('"scheduling": "static"' in r["settings"] for r in redone)
    assert {r["sample_id"]: r["output"] for r in redone} == {r["sample_id"]: r["output"] for r in ok}


def test_paper_preset_runs_on_the_fast_decoder_reproducibly(prefect_harness, workspace, model_path):
    """The released decoding (sampled beams, no-repeat 3-grams) goes through the fast decoder, and a rerun of
    the same samples draws the same rewrites (the seed is per batch). Its tokens equal Hugging Face
    ``generate``'s in tests/test_rewrite_search.py; this random model emits ``<image>`` tokens, where
    open_flamingo's ``generate`` changes every row's image attention (see docs/rewrite.md)."""
    from flows.rewrite import rewrite_flow

    make_samples(workspace, n=8)
    register_model(workspace, model_path)
    cfg = dict(preset="paper", shard_size=4, overrides={"max_new_tokens": 10})
    fast = rewrite_flow(config=_config(**cfg), workspace=workspace.root)
    assert fast["ok"] == fast["selected"] > 0 and fast["failed"] == 0
    first = _rows(workspace, "SELECT * FROM rewrites")
    assert all('"backend": "fast"' in r["settings"] and '"num_beams": 3' in r["settings"] for r in first)
    assert all('"scheduling": "static"' in r["settings"] for r in first)  # beams do not stream

    chosen = ", ".join(f"'{r['sample_id']}'" for r in first)
    again = rewrite_flow(config=_config(**cfg), workspace=workspace.root, where=f"sample_id IN ({chosen})")
    assert again["ok"] == fast["ok"]
    redone = _rows(workspace, "SELECT * FROM rewrites WHERE attempt = 2")
    assert {r["sample_id"]: r["output"] for r in redone} == {r["sample_id"]: r["output"] for r in first}
    assert len({r["output"] for r in first}) > 1


def _add_poisoned_sample(workspace):
    """One more sample ('s_poison') with an image of its own, whose file in the store is then truncated; returns
    the stored image and its good bytes."""
    stored = ImageStore(workspace.images).put(png((5, 250, 120), size=48))
    poisoned = Sample(sample_id="s_poison", source="gqa", split="val", task_type="vqa",
                      instruction="<image>\nIs it green?", raw_response="yes", images=[stored.image_id])  # fmt: skip
    lineage = LineageStore(workspace.db_path)
    with lineage.writer() as con:
        lineage.ingest_arrow("images", _image_table(stored), con=con)
        lineage.ingest_arrow("samples", samples_to_table([poisoned]), con=con)
    good_bytes = Path(stored.path).read_bytes()
    Path(stored.path).write_bytes(good_bytes[: len(good_bytes) // 3])
    return stored, good_bytes


def _image_table(stored):
    import pyarrow as pa

    from polite.images import IMAGE_SCHEMA

    return pa.Table.from_pylist([stored.to_row()], schema=IMAGE_SCHEMA)


def test_rerun_where_redoes_exactly_the_selection(prefect_harness, workspace, model_path):
    from typer.testing import CliRunner

    from flows.rewrite import rewrite_flow
    from polite.cli import app

    make_samples(workspace, n=9)
    model_id = register_model(workspace, model_path)
    sets = ["--set", "rewrite.overrides.max_new_tokens=12", "--set", "rewrite.token_budget=2048",
            "--set", "rewrite.max_batch_size=8", "--set", "rewrite.shard_size=4"]  # fmt: skip

    def dry_run(*args: str) -> str:  # one line per fact, however wide the terminal
        shown = CliRunner().invoke(app, [*args, "--dry-run", "--workspace", workspace.root, *sets])
        assert shown.exit_code == 0, shown.output
        return " ".join(shown.output.split())

    planned = dry_run("rewrite")
    assert f"dry run, rewrite (first): 9 samples in 3 shards of up to 4, with model {model_id}" in planned
    assert "gqa / vqa: 3" in planned and "coco / caption: 3" in planned
    assert _rows(workspace, "SELECT count(*) AS n FROM runs") == [{"n": 0}]  # nothing written, no flow
    assert not Path(workspace.stage_dir("rewrites")).exists()
    rewrite_flow(config=_config(shard_size=4), workspace=workspace.root)
    assert "rewrite (first): 0 samples in 0 shards" in dry_run("rewrite")
    before = {r["rewrite_id"]: r for r in _rows(workspace, "SELECT * FROM rewrites")}
    gqa = {r["sample_id"] for r in _rows(workspace, "SELECT sample_id FROM samples WHERE source = 'gqa'")}
    assert f"rewrite (rerun): {len(gqa)} samples in 1 shards" in dry_run("rerun", "--where", "source = 'gqa'")
    assert len(_rows(workspace, "SELECT * FROM rewrites")) == len(before)

    result = CliRunner().invoke(
        app, ["rerun", "--where", "source = 'gqa'", "--workspace", workspace.root, *sets]
    )
    assert result.exit_code == 0, result.output
    assert f"{len(gqa)} selected, {len(gqa)} ok" in result.output

    after = _rows(workspace, "SELECT * FROM rewrites")
    new = [r for r in after if r["rewrite_id"] not in before]
    assert {r["sample_id"] for r in new} == gqa and len(new) == len(gqa)
    assert all(
        r["reason"] == "rerun: source = 'gqa'" and r["attempt"] == 2 and r["status"] == "ok" for r in new
    )
    for r in after:
        if r["rewrite_id"] in before:
            old = before[r["rewrite_id"]]
            changed = {k for k in r if r[k] != old[k]}
            # the only change to an old row: the superseded gqa rewrites point at their replacement
            assert changed == ({"superseded_by"} if r["sample_id"] in gqa else set())
    accepted = _rows(workspace, "SELECT sample_id, count(*) AS n FROM rewrites WHERE status = 'ok' "
                                "AND superseded_by IS NULL GROUP BY 1")  # fmt: skip
    assert all(r["n"] == 1 for r in accepted) and len(accepted) == len(before)
    latest = _rows(workspace, "SELECT sample_id, attempt FROM lineage WHERE source = 'gqa'")
    assert {r["attempt"] for r in latest} == {2}

    # a rerun whose sample fails keeps its earlier rewrite (--retry-failed does not take it): the command
    # names the rerun that retries exactly the failed ones, and that rerun works once the image is back
    (victim,) = _rows(workspace, "SELECT s.images[1] AS image_id, im.path FROM samples s JOIN images im "
                                 "ON im.image_id = s.images[1] WHERE s.source = 'gqa' ORDER BY 1 LIMIT 1")  # fmt: skip
    hit = {r["sample_id"] for r in _rows(workspace, "SELECT sample_id FROM samples WHERE source = 'gqa' "
                                                    f"AND list_contains(images, '{victim['image_id']}')")}  # fmt: skip
    image = Path(workspace.root) / victim["path"]
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])
    again = CliRunner().invoke(app, ["rerun", "--where", "source = 'gqa'", "--workspace", workspace.root, *sets])
    assert again.exit_code == 0 and f"{len(gqa) - len(hit)} ok, {len(hit)} failed" in again.output, again.output
    suggested = " ".join(again.output.split()).split("retry them with `polite rerun --where \"")[1].split('\"`')[0]
    assert {r["sample_id"] for r in _rows(workspace, f"SELECT sample_id FROM lineage WHERE {suggested}")} == hit
    image.write_bytes(good)
    retried = CliRunner().invoke(app, ["rerun", "--where", suggested, "--workspace", workspace.root, *sets])
    assert retried.exit_code == 0 and f"{len(hit)} selected, {len(hit)} ok" in retried.output, retried.output

    refused = CliRunner().invoke(
        app, ["rerun", "--where", "true; DROP TABLE samples", "--workspace", workspace.root]
    )
    assert refused.exit_code == 2 and "is not a predicate over lineage" in refused.output
    assert len(_rows(workspace, "SELECT * FROM samples")) == 11
    # a misspelt column stops before any flow run starts, with the columns it may have meant
    runs = len(_rows(workspace, "SELECT * FROM runs"))
    misspelt = CliRunner().invoke(app, ["rerun", "--where", "sourc = 'gqa'", "--workspace", workspace.root])
    assert misspelt.exit_code == 2 and '"sourc" not found' in misspelt.output and '"source"' in misspelt.output
    assert len(_rows(workspace, "SELECT * FROM runs")) == runs


def test_a_dry_run_counts_what_a_killed_run_left_as_done_and_names_a_running_rewrite(
    prefect_harness, workspace, model_path
):
    """The flow ingests a killed run's result files before it picks work: the dry run leaves their samples out
    too, so its count is what the flow then does; a rewrite of the key running now is named, not "resumed"."""
    from typer.testing import CliRunner

    from flows.rewrite import rewrite_flow
    from polite.cli import app
    from polite.shards import read_table

    make_samples(workspace, n=9)
    model_id = register_model(workspace, model_path)
    rewrite_flow(config=_config(shard_size=4), workspace=workspace.root)
    (lost,) = _rows(workspace, "SELECT path, n_rows FROM rewrite_result_files ORDER BY path LIMIT 1")
    ids = read_table(workspace.locate(lost["path"])).column("rewrite_id").to_pylist()
    with LineageStore(workspace.db_path).writer() as con:  # as if the run was killed before ingesting it
        con.execute("DELETE FROM rewrites WHERE list_contains(?, rewrite_id)", [ids])
        con.execute("DELETE FROM rewrite_result_files WHERE path = ?", [lost["path"]])
    sets = ["--set", "rewrite.overrides.max_new_tokens=12", "--set", "rewrite.shard_size=4"]

    def dry_run() -> str:
        shown = CliRunner().invoke(app, ["rewrite", "--dry-run", "--workspace", workspace.root, *sets])
        assert shown.exit_code == 0, shown.output
        return " ".join(shown.output.split())

    planned = dry_run()
    assert "rewrite (first): 0 samples in 0 shards" in planned and "1 result files a killed run left" in planned
    # a misspelt source stops the real command, so the dry run says so instead of planning 0 samples
    typo = CliRunner().invoke(app, ["rewrite", "--dry-run", "--workspace", workspace.root, *sets,
                                    "--set", "rewrite.exclude_sources=[sorce]"])  # fmt: skip
    assert typo.exit_code == 2 and "rewrite.exclude_sources: unknown source 'sorce'" in typo.output, typo.output
    holder = hold_rewrite_lock(workspace, model_id)
    try:
        assert f"now: a rewrite with model {model_id}" in dry_run() and f"(pid {holder.pid} on" in dry_run()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    done = rewrite_flow(config=_config(shard_size=4), workspace=workspace.root)
    assert done["selected"] == 0 and done["recovered_files"] == 1
    assert len(_rows(workspace, "SELECT * FROM rewrites")) == 9


def test_a_missing_rewriter_stops_before_a_flow_starts(workspace, monkeypatch, model_path):
    """One line naming the folder, not a flow run's traceback: the command line checks the model first."""
    from typer.testing import CliRunner

    import flows.rewrite
    from polite.cli import app

    make_samples(workspace, n=2)

    def started(**kwargs):
        raise AssertionError("a flow started")

    monkeypatch.setattr(flows.rewrite.rewrite_flow, "with_options", lambda **kw: started)
    for args, message in ((["--model", "/nonexistent"], "rewriter '/nonexistent': no model folder at '/nonexistent'"),
                          (["--model", "m_deadbeef"], "rewriter 'm_deadbeef': no model with that id in the lineage"),
                          ([], "no rewriter in the lineage yet"),
                          # a prompt past the model's positions would decode garbage, stored as ok rewrites
                          (["--model", str(model_path), "--set", "rewrite.max_prompt_tokens=4096"],
                           "exceed the rewriter's context of 2048 positions"),
                          # a misspelt source would select nothing, silently
                          (["--model", str(model_path), "--set", "rewrite.sources=[gqaa]"],
                           "rewrite.sources: unknown source 'gqaa' (did you mean 'gqa'?)")):  # fmt: skip
        result = CliRunner().invoke(app, ["rewrite", "--workspace", workspace.root, *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_deployment_passes_the_config_as_a_path(prefect_harness, workspace, model_path, tmp_path):
    """Deployments give flows their config as a YAML path (`config: configs/nightly.yaml`): the stage flow reads
    it, so a path and the same settings inline make the same key and the same work."""
    from flows.rewrite import rewrite_flow

    make_samples(workspace, n=4)
    register_model(workspace, model_path)
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"workspace": workspace.root, "rewrite": {**FAST_REWRITE, "shard_size": 8}}))
    by_path = rewrite_flow(config=str(path), limit=2)
    assert (by_path["selected"], by_path["ok"], by_path["workspace"]) == (2, 2, workspace.root)
    inline = rewrite_flow(config=_config(shard_size=8), workspace=workspace.root)
    assert inline["settings_hash"] == by_path["settings_hash"] and inline["selected"] == 2
    from polite.config import ConfigError

    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'missing.yaml'} does not exist"):
        rewrite_flow(config=str(tmp_path / "missing.yaml"))


def test_a_shard_that_fails_whole_is_reported_and_resumed(prefect_harness, workspace, model_path, monkeypatch):
    """A shard whose task dies (here its work file is unreadable) costs only that shard: the command prints what
    landed, how many samples were not attempted and how to resume, exits 1 without a traceback, and the run's
    record in the lineage keeps the same counts. Running it again does only the samples left."""
    from typer.testing import CliRunner

    import flows.rewrite
    from polite.cli import app

    make_samples(workspace, n=9)
    register_model(workspace, model_path)
    cut = flows.rewrite.cut_shards

    def one_unreadable(*args, **kwargs):
        jobs = cut(*args, **kwargs)
        Path(jobs[1]["work"]).write_bytes(b"not parquet")
        return jobs

    monkeypatch.setattr(flows.rewrite, "cut_shards", one_unreadable)
    sets = ["--set", "rewrite.overrides.max_new_tokens=12", "--set", "rewrite.token_budget=2048",
            "--set", "rewrite.max_batch_size=8", "--set", "rewrite.shard_size=3"]  # fmt: skip
    failed = CliRunner().invoke(app, ["rewrite", "--workspace", workspace.root, *sets])
    assert failed.exit_code == 1, failed.output
    assert "9 selected, 6 ok, 0 failed, 3 not attempted in 3 shards" in failed.output
    assert "1 of 3 shards failed in rewrite (first)" in failed.output and "Traceback" not in failed.output
    run = _rows(workspace, "SELECT status, summary FROM runs WHERE flow = 'rewrite'")
    assert len(run) == 1 and run[0]["status"] == "failed"
    assert {k: json.loads(run[0]["summary"])[k] for k in ("ok", "failed", "unattempted")} == {
        "ok": 6, "failed": 0, "unattempted": 3}  # fmt: skip

    monkeypatch.setattr(flows.rewrite, "cut_shards", cut)
    resumed = CliRunner().invoke(app, ["rewrite", "--workspace", workspace.root, *sets])
    assert resumed.exit_code == 0, resumed.output
    assert "3 selected, 3 ok, 0 failed in 1 shards" in resumed.output
    accepted = _rows(workspace, "SELECT sample_id, count(*) AS n FROM rewrites WHERE status = 'ok' GROUP BY 1")
    assert len(accepted) == 9 and all(r["n"] == 1 for r in accepted)


@pytest.mark.slow
def test_sigkill_mid_run_resumes_without_losing_or_duplicating(prefect_harness, tmp_path, model_path):
    from prefect.settings import PREFECT_API_URL

    from flows.rewrite import rewrite_flow

    config = _config(shard_size=2, overrides={"max_new_tokens": 24})
    config["runner"] = {"max_workers": 1}
    config_file = tmp_path / "rewrite.yaml"
    config_file.write_text(yaml.safe_dump(config))
    killed, clean = (Workspace.resolve(str(tmp_path / name)).ensure() for name in ("killed", "clean"))
    for ws in (killed, clean):
        make_samples(ws, n=24, extra_hq=0)
        register_model(ws, model_path)
    n_shards = 12

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.rewrite", "--workspace", killed.root, "--config", str(config_file)],
        env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    results = Path(killed.root) / "shards" / "rewrites" / "results"

    def finished() -> list[Path]:  # not the temporary files of a write in progress
        return [p for p in results.rglob("*.parquet") if not p.name.startswith(".tmp-")]

    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(finished()) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    done_files = {p: p.stat().st_mtime_ns for p in finished()}
    assert 3 <= len(done_files) < n_shards
    assert _rows(killed, "SELECT status FROM runs WHERE flow = 'rewrite'") == [{"status": "running"}]
    assert len(_rows(killed, "SELECT * FROM rewrites")) < 24

    resumed = rewrite_flow(config=config, workspace=killed.root)
    # finished shards (ingested, or written but not yet ingested: recovered) are not selected again
    assert resumed["selected"] == 24 - 2 * len(done_files)
    assert resumed["shards"] == n_shards - len(done_files)
    assert {p: p.stat().st_mtime_ns for p in done_files} == done_files  # finished shards were not redone
    per_sample = _rows(killed, "SELECT sample_id, count(*) AS n, count(*) FILTER (WHERE status = 'ok') AS ok "
                               "FROM rewrites GROUP BY 1")  # fmt: skip
    assert len(per_sample) == 24 and all(r["n"] == 1 and r["ok"] == 1 for r in per_sample)

    rewrite_flow(config=config, workspace=clean.root)
    outputs = "SELECT sample_id, rewrite_id, output, output_tokens FROM rewrites ORDER BY sample_id"
    assert _rows(killed, outputs) == _rows(clean, outputs)


def test_a_second_flow_on_the_same_key_stops_before_any_work(prefect_harness, workspace, model_path):
    """Another process rewriting the same samples with the same model and settings holds the key's lock: this
    flow stops at once, naming it, and creates no run. The OS drops the lock when the holder dies (kill -9)."""
    from flows.rewrite import rewrite_flow
    from polite.locks import WorkspaceBusy

    make_samples(workspace, n=4)
    holder = hold_rewrite_lock(workspace, register_model(workspace, model_path))
    try:
        with pytest.raises(WorkspaceBusy, match=rf"already running in this workspace \(pid {holder.pid} on "):
            rewrite_flow(config=_config(), workspace=workspace.root)
        assert _rows(workspace, "SELECT count(*) AS n FROM runs WHERE flow = 'rewrite'") == [{"n": 0}]
        other = rewrite_flow(config=_config(overrides={"max_new_tokens": 8}), workspace=workspace.root)
        assert other["ok"] == other["selected"] > 0  # another key (settings) is not held up
    finally:
        holder.kill()
        holder.wait(timeout=30)
    done = rewrite_flow(config=_config(), workspace=workspace.root)
    assert done["ok"] == done["selected"] > 0


def test_work_is_ordered_by_image_and_a_resume_keeps_that_order(workspace, model_path):
    """Questions about one image share a shard (the image is decoded and encoded once there); the resume query
    orders what is left the same way, so a resumed run cuts the same shards."""
    from flows.rewrite import _not_done, select_work
    from polite.config.rewrite import RewriteSettings

    make_samples(workspace, n=12)
    model_id = register_model(workspace, model_path)
    store = LineageStore(workspace.db_path)
    key = {"model_id": model_id, "prompt_version": "pf-v1", "settings_hash": "h"}
    work = select_work(store, RewriteSettings(), key, "first", None, None)
    firsts = [ids[0] if ids else "" for ids in work.column("image_ids").to_pylist()]
    assert len(set(firsts)) < len(firsts)  # some images have several questions
    runs = [f for k, f in enumerate(firsts) if k == 0 or f != firsts[k - 1]]
    assert len(runs) == len(set(firsts))  # each image's questions are contiguous
    assert _not_done(store, work).column("rewrite_id").to_pylist() == work.column("rewrite_id").to_pylist()
    limited = select_work(store, RewriteSettings(), key, "first", None, 5)
    assert sorted(limited.column("sample_id").to_pylist()) == sorted(work.column("sample_id").to_pylist())[:5]


def test_work_rows_carry_stable_ids_and_each_image_path_in_order(workspace, model_path):
    """One query picks the work: the image paths line up with the image ids (an unknown id gets ''), a sample
    without images gets none, and each rewrite id is the documented hash, as older versions computed it."""
    import pyarrow as pa

    from flows.rewrite import WORK_ORDER, select_work
    from polite.config.rewrite import RewriteSettings
    from polite.ids import stable_hash

    store = LineageStore(workspace.db_path)
    store.migrate()
    model_id = register_model(workspace, model_path)
    images = pa.table({"image_id": ["i_a", "i_b", "i_c"], "path": ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"]})
    samples = pa.table(
        {
            "sample_id": ["s_1", "s_2", "s_3", "s_4", "s_5"],
            "source": ["unit"] * 5,
            "task_type": ["vqa"] * 5,
            "images": [["i_c", "i_a"], ["i_b", "i_missing", "i_a"], None, ["i_a"], ["i_c"]],
            "instruction": ["<image>q1", "<image>q2", "q3", "<image>q4", "<image>q5"],
            "raw_response": ["a1", "a2", "a3", "a4", "a5"],
            "status": ["ok", "ok", "ok", "ok", "failed"],
        }
    )
    with store.writer() as con:
        store.ingest_arrow("images", images, con=con)
        store.ingest_arrow("samples", samples, con=con)
    key = {"model_id": model_id, "prompt_version": "pf-v1", "settings_hash": "h"}
    work = select_work(store, RewriteSettings(), key, "first", None, None).to_pylist()

    assert [r["sample_id"] for r in work] == ["s_3", "s_4", "s_2", "s_1"]  # WORK_ORDER; s_5 failed at ingest
    assert WORK_ORDER.startswith("coalesce(image_ids[1], '')")
    by_id = {r["sample_id"]: r for r in work}
    assert by_id["s_1"]["image_paths"] == ["/p/c.jpg", "/p/a.jpg"]
    assert by_id["s_2"]["image_ids"] == ["i_b", "i_missing", "i_a"]
    assert by_id["s_2"]["image_paths"] == ["/p/b.jpg", "", "/p/a.jpg"]
    assert by_id["s_3"]["image_ids"] == [] and by_id["s_3"]["image_paths"] == []
    for r in work:
        assert r["attempt"] == 1 and r["reason"] == "first"
        assert r["rewrite_id"] == "r_" + stable_hash("rewrite", r["sample_id"], model_id, "pf-v1", "h", 1)
    assert [by_id[s]["instruction"] for s in ("s_1", "s_2", "s_3")] == ["<image>q1", "<image>q2", "q3"]


def test_bookkeeping_benchmark_keeps_one_accepted_rewrite_per_sample(tmp_path, bench_script):
    """bench/rewrite_lineage.py at a small size: first run with failures, resume, retry-failed and a rerun by SQL
    through the flow's own functions leave every sample exactly one accepted rewrite."""
    figures = bench_script("rewrite_lineage").main(
        ["--samples", "3000", "--shard-size", "256", "--failed-rate", "0.05", "--root", str(tmp_path)]
    )
    assert figures["first: rows"] == 3000
    assert figures["resume: rows left"] == 0 and figures["resume: orphaned result files"] == 0
    assert 60 < figures["retry-failed: rows"] < 250  # about 5% of 3000 failed the first time
    assert 300 < figures["rerun: rows"] < 900  # about 20% are from gqa
    # a gqa sample: its first attempt (and a retry, if that failed) and the rerun's
    assert figures["explain: rewrite attempts of that sample"] in (2, 3)
    assert figures["check: samples without exactly one accepted rewrite"] == 0


def test_the_rewrite_command_says_how_the_batches_fitted():
    from polite.cli import rewrite as cli

    summary = {"mode": "first", "selected": 10, "ok": 10, "failed": 0, "shards": 1, "model_id": "m_1",
               "settings_hash": "s_1", "output_tokens": 100, "tokens_per_s": 5.0, "batches": 3, "cache_grows": 2,
               "rows_continued": 0, "oom_splits": 0}  # fmt: skip
    with cli.console.capture() as captured:
        cli._report(summary)
    text = captured.get()
    assert "3 batches, 2 cache grows" in text and "continued" not in text and "out-of-memory" not in text


def test_an_empty_where_is_refused_not_run_as_a_plain_rewrite(prefect_harness, workspace, model_path):
    """``polite rerun --where "$PREDICATE"`` with the variable unset must stop, not rewrite everything not yet
    attempted under the ``first`` mode (or retry every failure)."""
    from flows.rewrite import rewrite_flow
    from polite.config import ConfigError

    make_samples(workspace, n=4)
    register_model(workspace, model_path)
    for retry_failed in (False, True):
        with pytest.raises(ConfigError, match="--where"):
            rewrite_flow(config=_config(), workspace=workspace.root, where="", retry_failed=retry_failed)
    assert _rows(workspace, "SELECT count(*) AS n FROM rewrites") == [{"n": 0}]
    assert _rows(workspace, "SELECT count(*) AS n FROM runs WHERE flow = 'rewrite'") == [{"n": 0}]


def _failed_attempts(workspace, model_id: str, sample_ids: list[str]) -> None:
    """Record one failed attempt under the FAST_REWRITE key for each of ``sample_ids``."""
    import pyarrow as pa

    from flows.rewrite import rewrite_ids
    from models.generation import resolve_generation
    from models.prompts import PROMPT_VERSION
    from polite.ids import settings_hash

    key = {"model_id": model_id, "prompt_version": PROMPT_VERSION,
           "settings_hash": settings_hash(resolve_generation("greedy", {"max_new_tokens": 12}))}  # fmt: skip
    n = len(sample_ids)
    table = pa.table({"rewrite_id": rewrite_ids(sample_ids, [1] * n, key), "sample_id": sample_ids,
                      "model_id": [model_id] * n, "prompt_version": [PROMPT_VERSION] * n,
                      "settings_hash": [key["settings_hash"]] * n, "attempt": pa.array([1] * n, pa.int32()),
                      "status": ["failed"] * n, "error": ["BadImageError: fake"] * n, "reason": ["first"] * n})  # fmt: skip
    LineageStore(workspace.db_path).ingest_arrow("rewrites", table)


@pytest.mark.parametrize("change", ["sources", "limit"])
def test_an_interrupted_retry_is_resumed_only_by_the_same_request(prefect_harness, workspace, model_path,
                                                                  monkeypatch, change):  # fmt: skip
    """A retry with other source filters, or another limit, is another request: it chooses its own work
    instead of resuming the manifest of an interrupted retry that chose something else."""
    import flows.rewrite
    from flows.rewrite import rewrite_flow
    from polite.shards import read_table

    samples = make_samples(workspace, n=9, extra_hq=0)
    model_id = register_model(workspace, model_path)
    _failed_attempts(workspace, model_id, [s.sample_id for s in samples])
    by_source = {src: sorted(s.sample_id for s in samples if s.source == src) for src in ("gqa", "coco")}
    chosen: list[str] = []

    def interrupted(task, jobs, ingest, description, **kwargs):
        raise KeyboardInterrupt("killed")

    def recorded(task, jobs, ingest, description, **kwargs):
        chosen.extend(sid for job in jobs for sid in read_table(job["work"]).column("sample_id").to_pylist())
        return []

    monkeypatch.setattr(flows.rewrite, "map_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rewrite_flow(config=_config(sources=["gqa"]), workspace=workspace.root, retry_failed=True, limit=1)
    monkeypatch.setattr(flows.rewrite, "map_shards", recorded)
    if change == "sources":
        rewrite_flow(config=_config(sources=["coco"]), workspace=workspace.root, retry_failed=True, limit=1)
        assert chosen == by_source["coco"][:1]
    else:
        rewrite_flow(config=_config(sources=["gqa"]), workspace=workspace.root, retry_failed=True)
        assert sorted(chosen) == by_source["gqa"]
    # the same request still resumes its own manifest
    chosen.clear()
    monkeypatch.setattr(flows.rewrite, "map_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rewrite_flow(config=_config(sources=["vqav2"]), workspace=workspace.root, retry_failed=True, limit=2)
    monkeypatch.setattr(flows.rewrite, "map_shards", recorded)
    rewrite_flow(config=_config(sources=["vqav2"]), workspace=workspace.root, retry_failed=True, limit=2)
    assert len(chosen) == 2


def test_ingesting_a_result_is_all_or_nothing(workspace, monkeypatch):
    """A rerun's result file whose ingest dies after its rows went in but before the earlier ok rewrite was
    marked superseded would leave two accepted rewrites of one sample (until that key runs again): the rows,
    the supersede and the note of the file commit together or not at all."""
    import pyarrow as pa

    import flows.rewrite
    from flows.rewrite import ingest_result
    from polite.shards import write_table_atomic
    from tasks.rewrite import RESULT_SCHEMA

    store = LineageStore(workspace.db_path)
    store.migrate()
    key = {"model_id": "m_1", "prompt_version": "pf-v1", "settings_hash": "h"}

    def result(attempt: int) -> str:
        row = {"rewrite_id": f"r_{attempt}", "sample_id": "s_1", **key, "attempt": attempt, "status": "ok",
               "output": f"take {attempt}", "run_id": "run_x", "reason": "rerun: true"}  # fmt: skip
        path = f"{workspace.root}/attempt{attempt}.parquet"
        write_table_atomic(pa.Table.from_pylist([row], schema=RESULT_SCHEMA), path)
        return path

    ingest_result(store, result(1), "run_x", key)
    second = result(2)
    monkeypatch.setattr(flows.rewrite, "_SUPERSEDE", "SELECT error('killed while superseding')")
    with pytest.raises(duckdb.Error, match="killed while superseding"):
        ingest_result(store, second, "run_x", key)
    accepted = "SELECT rewrite_id FROM rewrites WHERE status = 'ok' AND superseded_by IS NULL ORDER BY 1"
    assert _rows(workspace, accepted) == [{"rewrite_id": "r_1"}]
    assert _rows(workspace, "SELECT count(*) AS n FROM rewrite_result_files") == [{"n": 1}]
    monkeypatch.undo()
    ingest_result(store, second, "run_x", key)  # what the next run's recovery does
    assert _rows(workspace, accepted) == [{"rewrite_id": "r_2"}]


def test_a_result_row_that_was_not_stored_supersedes_nothing(workspace):
    """Two result files can hold one rewrite id (a shard task of a killed Ray run that finishes after the next
    run redid that sample). Only the stored row counts: an ok copy of a rewrite stored as failed must not
    retire the accepted rewrite, which would leave the sample with none."""
    import pyarrow as pa

    from flows.rewrite import ingest_result
    from polite.shards import write_table_atomic
    from tasks.rewrite import RESULT_SCHEMA

    store = LineageStore(workspace.db_path)
    store.migrate()
    key = {"model_id": "m_1", "prompt_version": "pf-v1", "settings_hash": "h"}

    def result(name: str, attempt: int, status: str) -> str:
        row = {"rewrite_id": f"r_{attempt}", "sample_id": "s_1", **key, "attempt": attempt, "status": status,
               "output": "text" if status == "ok" else None, "run_id": "run_x", "reason": "rerun: true"}  # fmt: skip
        path = f"{workspace.root}/{name}.parquet"
        write_table_atomic(pa.Table.from_pylist([row], schema=RESULT_SCHEMA), path)
        return path

    ingest_result(store, result("first", 1, "ok"), "run_x", key)
    ingest_result(store, result("rerun", 2, "failed"), "run_x", key)
    ingest_result(store, result("late-copy", 2, "ok"), "recovered", key)
    accepted = "SELECT rewrite_id FROM rewrites WHERE status = 'ok' AND superseded_by IS NULL"
    assert _rows(workspace, accepted) == [{"rewrite_id": "r_1"}]


def test_a_shard_cut_again_works_from_this_run_s_rows(workspace):
    """A rerun killed before its shard finished leaves the shard's work file; a retry that picks the same
    samples at the same attempts cuts a shard of the same name, and must record its own reason, not the rerun's."""
    import pyarrow as pa

    from flows.rewrite import cut_shards
    from polite.shards import read_table
    from tasks.rewrite import WORK_SCHEMA

    def work(reason: str) -> pa.Table:
        row = {"rewrite_id": "r_x2", "sample_id": "s_x", "attempt": 2, "reason": reason, "instruction": "q",
               "raw_response": "a", "image_ids": [], "image_paths": []}  # fmt: skip
        return pa.Table.from_pylist([row], schema=WORK_SCHEMA)

    base = workspace.stage_dir("rewrites")
    killed = cut_shards(work("rerun: sample_id = 's_x'"), 4, base, f"{base}/results", {})
    retried = cut_shards(work("retry-failed"), 4, base, f"{base}/results", {})
    assert killed[0]["work"] == retried[0]["work"]  # the same rewrite ids: the same shard
    assert read_table(retried[0]["work"]).column("reason").to_pylist() == ["retry-failed"]


def test_an_interrupted_request_is_found_behind_many_later_runs(workspace):
    """A rerun killed long ago is still resumed after hundreds of other rewrite runs (a scheduled factory)."""
    import datetime

    from flows.rewrite import _pending_manifest

    store = LineageStore(workspace.db_path)
    store.migrate()
    manifest = f"{workspace.root}/manifest.parquet"
    Path(manifest).write_bytes(b"")
    start = datetime.datetime(2024, 1, 1)
    rows = [("run_old", "running", start, {"request": {"key": "q_old", "manifest": manifest}})]
    rows += [(f"run_{k}", "completed", start + datetime.timedelta(minutes=k + 1), {"request": {"key": f"q_{k}"}})
             for k in range(250)]  # fmt: skip
    with store.writer() as con:
        con.executemany(
            "INSERT INTO runs (run_id, flow, status, started_at, config) VALUES (?, 'rewrite', ?, ?, ?)",
            [(r, s, t, json.dumps(c)) for r, s, t, c in rows],
        )
    assert _pending_manifest(store, workspace, "q_old") == manifest
    assert _pending_manifest(store, workspace, "q_7") is None  # completed
    with store.writer() as con:  # as the flow records it now: relative to the workspace, so it survives a move
        con.execute("UPDATE runs SET config = ? WHERE run_id = 'run_old'",
                    [json.dumps({"request": {"key": "q_old", "manifest": "manifest.parquet"}})])  # fmt: skip
    assert _pending_manifest(store, workspace, "q_old") == manifest
