"""The filter flow end to end on a real DuckDB lineage under Prefect: scores and decisions recorded, resume,
rethreshold from stored scores (SQL equal to the Python chain), full scoring, funnel, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from filters.chain import build_chain
from filters.funnel import funnel
from filters.shard import items_from_table
from filters.sql import work_sql
from filters.tiny import make_tiny_scorer_models
from lineage.store import LineageStore
from polite.images import IMAGE_SCHEMA, ImageStore
from polite.record import Sample, samples_to_table
from polite.shards import write_bytes_atomic

CAPTION_TEXT = (
    "The image shows a brown dog lying on a grey sofa in a bright living room.\n\n"
    "A window behind the sofa lets in soft daylight."
)
CASES = [
    # (source, task_type, with image, instruction, raw, rewrite)
    ("coco", "caption", True, "<image>Describe the image.", "a dog on a sofa", CAPTION_TEXT),
    ("coco", "caption", True, "<image>Describe the image.", "a dog on a sofa", "A dog on a sofa."),
    (
        "coco",
        "caption",
        True,
        "<image>Describe the image.",
        "a man riding a horse on a beach",
        "A bowl of pasta with tomato sauce sits on a wooden kitchen table.",
    ),
    (
        "coco",
        "caption",
        False,
        "Describe the scene.",
        "two cats on a bed",
        "Two cats are sleeping on a bed. Two cats are sleeping on a bed. Two cats are sleeping on a bed.",
    ),
    ("vqa", "vqa", True, "<image>Is there a dog?", "yes", "Yes, there is a brown dog lying on the sofa."),
    ("vqa", "vqa", True, "<image>How many cats are there?", "2", "There are two cats sitting on the bed and"),
    ("vqa", "vqa", True, "<image>What colour is the car?", "red", "Red."),
    (
        "gqa",
        "vqa",
        True,
        "<image>Where is the cup?",
        "on the table",
        "The cup is standing on the wooden table...",
    ),
    ("gqa", "vqa", True, "<image>Is the sky clear?", "no", "No, the sky is covered with thick grey clouds."),
    (
        "gqa",
        "conversation",
        False,
        "Tell me a joke.",
        "no",
        "Why did the chicken cross the road? To get to the other side.",
    ),
    # its image file is missing until the test writes it: the clipscore error is recorded, then retried
    (
        "coco",
        "caption",
        "missing",
        "<image>Describe the image.",
        "a red car parked on a street",
        "The image shows a red car parked on a quiet street.",
    ),
]


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def missing_image(workspace) -> str:
    return workspace.url("images", "mi", "missing.png")


def populate(workspace) -> LineageStore:
    store = LineageStore(workspace.db_path)
    store.migrate()
    images = ImageStore(workspace.images)
    stored = [images.put(png(c)) for c in [(200, 30, 30), (30, 200, 30)]]
    missing = {
        "image_id": "i_missing",
        "path": missing_image(workspace),
        "format": "PNG",
        "width": 40,
        "height": 32,
        "n_bytes": 1,
    }
    rows = [s.to_row() for s in stored] + [missing]
    store.ingest_arrow("images", pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    samples, rewrites = [], []
    for i, (source, task_type, with_image, instruction, raw, rewrite) in enumerate(CASES):
        sid = f"s_{i:02d}"
        samples.append(
            Sample(
                sid,
                source,
                "train",
                task_type,
                instruction,
                raw,
                images=["i_missing"]
                if with_image == "missing"
                else [stored[i % 2].image_id]
                if with_image
                else [],
            )
        )
        # an older attempt and a failed one must be ignored in favour of the latest ok rewrite
        rewrites.append(
            {
                "rewrite_id": f"r_{i:02d}_old",
                "sample_id": sid,
                "model_id": "m",
                "settings_hash": "h",
                "attempt": 0,
                "status": "ok",
                "output": "stale text that should never be scored",
                "created_at": "2020-01-01 00:00:00",
            }
        )
        rewrites.append(
            {
                "rewrite_id": f"r_{i:02d}",
                "sample_id": sid,
                "model_id": "m",
                "settings_hash": "h",
                "attempt": 1,
                "status": "ok",
                "output": rewrite,
                "created_at": "2021-01-01 00:00:00",
            }
        )
    rewrites.append(
        {
            "rewrite_id": "r_fail",
            "sample_id": "s_00",
            "model_id": "m",
            "settings_hash": "h",
            "attempt": 2,
            "status": "failed",
            "output": None,
            "created_at": "2022-01-01 00:00:00",
        }
    )
    store.ingest_arrow("samples", samples_to_table(samples))
    table = pa.Table.from_pylist(rewrites)
    store.ingest_arrow(
        "rewrites",
        table.set_column(
            table.schema.get_field_index("created_at"),
            "created_at",
            table.column("created_at").cast(pa.timestamp("us")),
        ),
    )
    return store


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    texts = [c[3] + " " + c[4] + " " + c[5] for c in CASES]
    return make_tiny_scorer_models(tmp_path_factory.mktemp("filter-models"), texts)


def decisions(store, settings_hash):
    rows = store.query(
        "SELECT rewrite_id, kept, reason, final_output, dropped_by, removed_paragraphs FROM decisions "
        "WHERE settings_hash = ? ORDER BY rewrite_id",
        [settings_hash],
    ).to_pylist()
    return {r.pop("rewrite_id"): r for r in rows}


def assert_funnel_artifact(rows) -> None:
    """The flow stored the funnel as a Prefect table artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    # The Prefect test server is shared by every test on this worker (the factory test files a funnel too):
    # the newest artifact under the key is this flow's, since one worker runs its tests one at a time.
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["filter-funnel"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert found and found[0].type == "table"
    data = found[0].data if isinstance(found[0].data, list) else json.loads(found[0].data)
    assert len(data) == len(rows)


def assert_sql_matches_python(store, config):
    """The decisions --rethreshold wrote (SQL) equal what the Python chain decides from the same scores."""
    chain = build_chain(config["filters"])
    sql_side = decisions(store, chain.settings_hash)
    with store.reader() as con:
        work = con.sql(work_sql(chain, pending_only=False)).to_arrow_table()
    items, prior = items_from_table(work)
    _, py_rows = chain.run(items, prior=prior)
    assert len(py_rows) == len(sql_side) == len(CASES)
    for row in py_rows:
        if row["reason"].startswith("unscored") or sql_side[row["rewrite_id"]]["reason"].startswith(
            "unscored"
        ):
            continue  # SQL cannot score what was never scored; Python just did
        expect = {k: row[k] for k in ("kept", "reason", "final_output", "dropped_by", "removed_paragraphs")}
        assert sql_side[row["rewrite_id"]] == expect, row["rewrite_id"]


@pytest.mark.slow
def test_filter_flow_records_resumes_rethresholds_and_reports(prefect_harness, workspace, models):
    from flows.filter import filter_flow

    store = populate(workspace)
    config = {
        "filters": {**models, "shard_size": 4, "clipscore": {**models["clipscore"], "threshold": -100.0}}
    }
    summary = filter_flow(config=config, workspace=workspace.root)
    assert summary["rewrites"] == len(CASES) and summary["shards"] == 3
    h = summary["settings_hash"]
    names = {r["scorer"] for r in store.query("SELECT DISTINCT scorer FROM scores").to_pylist()}
    assert names == {
        "rouge",
        "length",
        "unchanged",
        "repetition",
        "truncated",
        "answer",
        "semantic",
        "nli",
        "clipscore",
        "reward",
        "reward_raw",
    }
    assert (
        store.query("SELECT count(*) AS n FROM scores WHERE rewrite_id LIKE '%old' OR rewrite_id = 'r_fail'")[
            "n"
        ][0].as_py()
        == 0
    )
    first = decisions(store, h)
    assert set(first) == {f"r_{i:02d}" for i in range(len(CASES))}
    # No paragraph cut: the decision stores no copy of the text, the lineage view shows the rewrite itself.
    assert first["r_00"]["kept"] and first["r_00"]["final_output"] is None
    r_00 = store.query("SELECT l.final_output FROM lineage l WHERE l.rewrite_id = 'r_00'").to_pylist()
    assert r_00 == [{"final_output": CAPTION_TEXT}]
    assert first["r_01"]["reason"] == "dropped: unchanged 1.00 >= 0.95"
    assert first["r_02"]["dropped_by"] == "semantic" and first["r_02"]["reason"].startswith(
        "dropped: semantic 0."
    )
    assert first["r_03"]["dropped_by"] == "repetition"
    assert first["r_05"]["reason"].startswith("dropped: truncated: ends mid-sentence")
    assert first["r_06"]["reason"] == "dropped: length 2 tokens < 4"
    assert first["r_07"]["reason"] == "dropped: truncated: ends with '...'"
    # dropped early -> never scored by the costly scorers
    early = store.query(
        "SELECT count(*) AS n FROM scores WHERE rewrite_id = 'r_06' AND scorer IN ('nli', 'reward')"
    )
    assert early["n"][0].as_py() == 0
    nli = store.query(
        "SELECT score, details FROM scores WHERE scorer = 'nli' AND rewrite_id = 'r_04'"
    ).to_pylist()[0]
    probs = json.loads(nli["details"])
    assert nli["score"] == pytest.approx(probs["entailment"] - probs["contradiction"], abs=1e-5)
    # the lineage view pivots the scores into columns
    view = store.query(
        "SELECT reward, raw_reward, nli, kept FROM lineage WHERE sample_id = 's_09'"
    ).to_pylist()[0]
    assert (
        view["reward"] is not None
        and view["raw_reward"] is not None
        and view["kept"] == first["r_09"]["kept"]
    )

    # funnel: entered = dropped + kept at every step, the final step matches the decisions
    rows = summary["funnel"]
    assert all(r["entered"] == r["dropped"] + r["kept"] for r in rows)
    final = next(r for r in rows if r["source"] == "(all)" and r["scorer"] == "final")
    assert final["kept"] == sum(d["kept"] for d in first.values()) == summary["kept"]
    assert rows == funnel(store, h)
    assert_funnel_artifact(rows)
    assert summary["kept"] > 0  # r_00 at least, so the kept rewards are reported too
    assert {r["which"] for r in summary["rewards"]} == {"raw", "rewritten", "kept"}

    # a bad image fails its own sample only, with the error recorded
    assert (
        first["r_10"]["reason"].startswith("dropped: clipscore error: ")
        and "missing.png" in first["r_10"]["reason"]
    )

    # resume: only the errored score is retried (the image is back now); nothing else is rescored
    n_scores = store.query("SELECT count(*) AS n FROM scores")["n"][0].as_py()
    write_bytes_atomic(png((10, 10, 200)), missing_image(workspace))
    again = filter_flow(config=config, workspace=workspace.root)
    assert again["rewrites"] == 1
    retried = decisions(store, h)["r_10"]
    assert retried["kept"] and retried["reason"] == "kept"
    assert (
        store.query("SELECT count(*) AS n FROM scores")["n"][0].as_py() == n_scores + 2
    )  # + reward, reward_raw
    assert store.query("SELECT count(*) AS n FROM scores WHERE score IS NULL")["n"][0].as_py() == 0
    first["r_10"] = retried
    n_scores += 2
    assert filter_flow(config=config, workspace=workspace.root)["rewrites"] == 0

    # rethreshold: no model is loaded, scores unchanged, SQL decisions == the Python chain on stored scores
    strict = {
        "filters": {
            **config["filters"],
            "semantic": {"threshold": 0.99},
            "clipscore": {**models["clipscore"], "threshold": 100.0},
            "length": {"min_tokens": 12},
        }
    }
    re = filter_flow(config=strict, workspace=workspace.root, rethreshold=True)
    assert re["rethreshold"]["decided"] == len(CASES)
    assert store.query("SELECT count(*) AS n FROM scores")["n"][0].as_py() == n_scores
    sql_side = decisions(store, re["settings_hash"])
    assert (
        sql_side["r_00"]["reason"].startswith("dropped: semantic")
        or sql_side["r_00"]["dropped_by"] == "length"
    )
    assert_sql_matches_python(store, strict)

    # back to the first thresholds: their decisions become the latest again, from stored scores
    back = filter_flow(config=config, workspace=workspace.root)
    assert back["rewrites"] == 0 and back["refreshed"] == len(CASES)
    assert back["refreshed_kept"] == {"before": re["rethreshold"]["kept"], "after": back["kept"]}
    latest = store.query("SELECT rewrite_id, settings_hash, thresholds FROM latest_decisions").to_pylist()
    assert {r["settings_hash"] for r in latest if r["rewrite_id"] in first} == {h}
    # thresholds are stored once per settings hash, and the view gives them to every decision
    stored = {r["settings_hash"]: json.loads(r["thresholds"]) for r in store.query(
        "SELECT * FROM decision_settings").to_pylist()}  # fmt: skip
    assert set(stored) == {h, re["settings_hash"]} and stored[h]["settings_hash"] == h
    assert stored[re["settings_hash"]]["scorers"]["semantic"]["threshold"] == 0.99
    assert all(json.loads(r["thresholds"]) == stored[h] for r in latest if r["rewrite_id"] in first)
    assert store.query("SELECT count(thresholds) AS n FROM decisions")["n"][0].as_py() == 0

    # full scoring fills the costly scores of early drops without changing any decision
    full = filter_flow(config=config, workspace=workspace.root, full_scoring=True)
    assert full["rewrites"] > 0
    assert (
        store.query("SELECT count(*) AS n FROM scores WHERE rewrite_id = 'r_06' AND scorer = 'reward'")["n"][
            0
        ].as_py()
        == 1
    )
    same = ("kept", "reason", "dropped_by")
    assert {k: {f: v[f] for f in same} for k, v in decisions(store, h).items()} == {
        k: {f: v[f] for f in same} for k, v in first.items()
    }
    # now every rewrite carries every score: SQL and Python agree on all of them, nothing left unscored
    redo = filter_flow(config=strict, workspace=workspace.root, rethreshold=True)
    assert not any(
        d["reason"].startswith("unscored") for d in decisions(store, redo["settings_hash"]).values()
    )
    assert_sql_matches_python(store, strict)


def test_cli_rethreshold_with_set(prefect_harness, workspace, models):
    from typer.testing import CliRunner

    from polite.cli import app

    populate(workspace)
    runner = CliRunner()
    result = runner.invoke(app, ["filter", "-w", workspace.root, "--set", "length.min_tokens=3"])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "filters.nli.model" in result.output
    result = runner.invoke(
        app, ["filter", "-w", workspace.root, "--rethreshold", "--set", "length.min_tokens=50"]
    )
    assert result.exit_code == 0, result.output
    assert f"re-decided {len(CASES)} rewrites" in result.output and ": 0 kept" in result.output
    # a plain run with the first thresholds undoes that rethreshold, and says so (its dry run first)
    first = ["filter", "-w", workspace.root, "--set", "length.min_tokens=3"]
    shown = runner.invoke(app, [*first, "--dry-run"], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert "0 rewrites to decide" in shown.output and f"would re-decide {len(CASES)} rewrites" in shown.output
    kept = int(shown.output.split("kept 0 -> ")[1].split(".")[0])
    result = runner.invoke(app, first, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"re-decided {len(CASES)} rewrites whose latest decision used other thresholds" in result.output
    (store_kept,) = LineageStore(workspace.db_path).query("SELECT count(*) FILTER (WHERE kept) FROM latest_decisions").to_pylist()[0].values()
    assert f"kept 0 -> {kept}" in result.output and store_kept == kept > 0
    again = runner.invoke(app, first, env={"COLUMNS": "300"})
    assert again.exit_code == 0 and "re-decided" not in again.output  # nothing to undo any more
    bad = runner.invoke(app, ["filter", "-w", workspace.root, "--set", "semantic.threshold=2"])
    assert bad.exit_code == 2 and "semantic.threshold" in bad.output
    for value, why in (("semantic.threshold=[1", "is not valid YAML"),
                       ("semantic.threshold.x=1", "filters.semantic.threshold is a value, not a section")):  # fmt: skip
        bad = runner.invoke(app, ["filter", "-w", workspace.root, "--set", value], env={"COLUMNS": "300"})
        assert bad.exit_code == 2 and why in bad.output and "Traceback" not in bad.output


def test_a_misspelt_device_is_refused_before_any_work(prefect_harness, workspace):
    from flows.filter import filter_flow
    from polite.config import ConfigError

    store = populate(workspace)
    with pytest.raises(ConfigError, match="filters.device: .*'gpu' is not a torch device"):
        filter_flow(config={"filters": {"device": "gpu"}}, workspace=workspace.root)
    assert store.query("SELECT count(*) AS n FROM scores")["n"][0].as_py() == 0
    assert store.query("SELECT count(*) AS n FROM runs WHERE flow = 'filter'")["n"][0].as_py() == 0


def test_an_error_behind_an_earlier_drop_is_not_work_every_run(prefect_harness, workspace, monkeypatch):
    """An errored score the chain cannot reach (an earlier scorer's stored score now drops the rewrite) is
    not selected as work: it would never be rescored, so a second run with nothing to change selects nothing."""
    from filters.text import TruncatedScorer
    from flows.filter import filter_flow

    store = populate(workspace)
    cheap = {name: {"enabled": False} for name in ("answer", "semantic", "nli", "clipscore", "reward")}
    loose = {"filters": {**cheap, "shard_size": 4}}
    measure = TruncatedScorer.measure

    def flaky(self, items):  # r_00's text makes `truncated` raise: an error row, as an unreadable image would
        if any(i.rewrite == CAPTION_TEXT for i in items):
            raise RuntimeError("flaky scorer")
        return measure(self, items)

    monkeypatch.setattr(TruncatedScorer, "measure", flaky)
    first = filter_flow(config=loose, workspace=workspace.root)
    assert decisions(store, first["settings_hash"])["r_00"]["reason"].startswith("dropped: truncated error: ")
    monkeypatch.setattr(TruncatedScorer, "measure", measure)

    # a stricter length floor now drops r_00 before `truncated`: its error row can never be retried
    strict = {"filters": {**loose["filters"], "length": {"min_tokens": 100}}}
    second = filter_flow(config=strict, workspace=workspace.root)
    assert second["rewrites"] == len(CASES)
    assert decisions(store, second["settings_hash"])["r_00"]["dropped_by"] == "length"
    n_scores = store.query("SELECT count(*) AS n FROM scores")["n"][0].as_py()
    again = filter_flow(config=strict, workspace=workspace.root)
    assert again["rewrites"] == 0 and again["shards"] == 0
    assert store.query("SELECT count(*) AS n FROM scores")["n"][0].as_py() == n_scores

    # back to the loose floor the chain reaches `truncated` again: the error is retried, and then done
    back = filter_flow(config=loose, workspace=workspace.root)
    assert back["rewrites"] == 1
    assert decisions(store, first["settings_hash"])["r_00"]["reason"] == "kept"
    assert store.query("SELECT count(*) AS n FROM scores WHERE score IS NULL")["n"][0].as_py() == 0
    assert filter_flow(config=loose, workspace=workspace.root)["rewrites"] == 0


def test_a_rethreshold_dry_run_says_what_the_real_one_then_does_and_writes_nothing(prefect_harness, workspace, models):
    from collections import Counter

    import yaml
    from typer.testing import CliRunner

    from filters.sql import preview
    from flows.filter import filter_flow
    from polite.cli import app

    store = populate(workspace)
    # every scorer scores every rewrite, so a relaxed threshold can keep what it alone dropped
    filter_flow(config={"filters": {**models, "length": {"min_tokens": 10}}}, workspace=workspace.root,
                full_scoring=True)  # fmt: skip
    count = lambda sql: store.query(sql).to_pylist()[0]["n"]  # noqa: E731
    written = {t: count(f"SELECT count(*) AS n FROM {t}") for t in ("decisions", "decision_settings", "runs")}
    before = {r["rewrite_id"]: r for r in store.query("SELECT rewrite_id, kept, dropped_by FROM latest_decisions").to_pylist()}
    # the long caption kept so far is too long now, and a caption semantic similarity dropped (and CLIPScore would)
    # passes both
    new = {"filters": {**models, "length": {"min_tokens": 10, "max_tokens": 20}, "semantic": {"threshold": -1.0},
                       "clipscore": {**models["clipscore"], "threshold": -100.0}}}  # fmt: skip
    (config := Path(workspace.root) / "new.yaml").write_text(yaml.safe_dump(new))
    shown = CliRunner().invoke(app, ["filter", "-w", workspace.root, "-c", str(config), "--rethreshold", "--dry-run"],
                               env={"COLUMNS": "200"})  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert {t: count(f"SELECT count(*) AS n FROM {t}") for t in written} == written  # nothing written
    with store.reader() as con:
        change = preview(con, build_chain(new["filters"]))

    filter_flow(config=new, workspace=workspace.root, rethreshold=True)
    after = store.query("SELECT rewrite_id, kept, dropped_by FROM latest_decisions").to_pylist()
    assert change["decided"] == len(after) == len(CASES)
    assert (change["kept_now"], change["kept_new"]) == (sum(r["kept"] for r in before.values()),
                                                        sum(r["kept"] for r in after))  # fmt: skip
    assert change["dropped_by"] == dict(Counter(r["dropped_by"] for r in after if not r["kept"]))
    lost = Counter(r["dropped_by"] for r in after if before[r["rewrite_id"]]["kept"] and not r["kept"])
    gained = Counter(before[r["rewrite_id"]]["dropped_by"] for r in after
                     if r["kept"] and not before[r["rewrite_id"]]["kept"])  # fmt: skip
    assert change["now_kept"] == dict(lost) == {"length": 1}
    assert change["now_dropped"] == dict(gained) == {"semantic": 1}
    assert f"kept {change['kept_now']} -> {change['kept_new']} ({change['kept_new'] - change['kept_now']:+d})" in shown.output
    assert "would drop 1 kept now, by: length 1" in shown.output
    assert "would keep 1 dropped now (by: semantic 1)" in shown.output
