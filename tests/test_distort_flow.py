"""The distort flow end to end under Prefect on a real DuckDB file: all three methods, resume, retry, export."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lineage.store import LineageStore
from models.prompts import rewrite_prompt
from polite.config import ConfigError
from polite.images import ImageStore
from polite.record import Sample, samples_to_table
from tasks.distort.stub_server import StubChatServer


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def seed_lineage(workspace) -> LineageStore:
    """6 demo scenes (detailed captions with captions+boxes, one image each), 4 text-only conversations,
    plus rows the stage must leave alone: a failed sample, a VQA sample, an empty response (and one whose
    meta is broken, fit for augment only)."""
    store = LineageStore(workspace.db_path)
    store.migrate()
    images = ImageStore(workspace.images)
    stored = [images.put(png((40 * i, 100, 200))) for i in range(6)]
    store.ingest_arrow("images", pa.Table.from_pylist([s.to_row() for s in stored]))
    samples = [
        Sample(
            sample_id=f"s_demo_{i}", source="demo", split="hq", task_type="detailed_caption",
            instruction="<image>\nDescribe this image in detail.",
            raw_response=f"A red bus number {i} waits at a stop. Two people stand beside it. The sky is clear.",
            images=[stored[i].image_id],
            meta={"captions": [f"a bus {i}", "people at a stop", "a red bus", "a street", "a clear day"],
                  "boxes": [["bus", [0.1, 0.2, 0.8, 0.9]], ["person", [0.05, 0.4, 0.15, 0.95]]]},
        )
        for i in range(6)
    ] + [
        Sample(sample_id=f"s_chat_{i}", source="llava", split="train", task_type="conversation",
               instruction=f"What should I pack for a trip number {i}?",
               raw_response="Pack light clothes, a charger and sunscreen. Keep your passport in a safe pocket.")
        for i in range(4)
    ] + [
        Sample(sample_id="s_bad", source="demo", split="hq", task_type="detailed_caption", instruction="x",
               raw_response="", status="failed", error="image cannot be decoded"),
        Sample(sample_id="s_vqa", source="demo", split="hq", task_type="vqa", instruction="<image>Q?",
               raw_response="yes"),
        Sample(sample_id="s_empty", source="llava", split="train", task_type="conversation", instruction="Hi",
               raw_response="  "),
    ]  # fmt: skip
    store.ingest_arrow("samples", samples_to_table(samples))
    # A row whose meta is not JSON at all: augment may use it, retrieve must skip it without an error.
    broken = samples_to_table([Sample(sample_id="s_badmeta", source="demo", split="hq", task_type="detailed_caption",
                                      instruction="Describe.", raw_response="A cat. A hat.")])  # fmt: skip
    store.ingest_arrow("samples", broken.set_column(broken.schema.get_field_index("meta"), "meta", pa.array(["{oops"])))
    return store


def config(base_url: str, retry: int = 1) -> dict:
    return {
        "seed": 7,
        "distort": {
            "shard_size": 4,
            "mix": [
                {"method": "augment"},
                {"method": "retrieve", "sources": ["demo"]},
                {"method": "llm", "sources": ["llava"], "count": 3},
            ],
            "llm": {"backend": "openai", "model": "stub-llm", "base_url": base_url, "max_retries": retry,
                    "backoff_s": 0.01, "timeout_s": 5},
        },
    }  # fmt: skip


def pairs(store: LineageStore) -> list[dict]:
    return store.query("SELECT * FROM pairs ORDER BY pair_id").to_pylist()


@pytest.mark.slow
def test_distort_flow_resumes_retries_and_exports(prefect_harness, workspace, tmp_path):
    from flows.distort import distort_flow, write_training_set

    store = seed_lineage(workspace)
    ws = str(workspace.root)
    with StubChatServer() as server:
        # 1. The LLM server fails every request: llm pairs are recorded as failed, the others are made.
        first = distort_flow(config=config(server.url("500")), workspace=ws)
        assert first["augment_selected"] == 11 and first["retrieve_selected"] == 6 and first["llm_selected"] == 3
        assert first["retrieve_ok"] == 6 and first["llm_failed"] == 3
        assert first["augment_ok"] + first.get("augment_failed", 0) == 11
        made = pairs(store)
        assert len(made) == 20
        llm = [p for p in made if p["method"] == "llm"]
        assert all("HTTP 500" in p["error"] and p["status"] == "failed" for p in llm)
        assert {p["sample_id"] for p in made} == {f"s_demo_{i}" for i in range(6)} | {f"s_chat_{i}" for i in range(4)} | {"s_badmeta"}
        assert all(p["run_id"] and p["variant"] and p["seed"] is not None for p in made)
        assert all(p["instruction"] and p["original"] for p in made)

        # 2. Same config again: nothing new to do (failed pairs count as made unless retried).
        second = distort_flow(config=config(server.url("500")), workspace=ws)
        assert second["augment_selected"] == second["retrieve_selected"] == second["llm_selected"] == 0
        assert pairs(store) == made

        # 3. Retry the failed ones against a working server: the same pair ids, now ok.
        third = distort_flow(config=config(server.url("ok")), workspace=ws, retry_failed=True, methods=["llm"])
        assert third == {"llm_selected": 3, "llm_ok": 3, "shards": 1}
        after = pairs(store)
        assert len(after) == 20
        llm_after = [p for p in after if p["method"] == "llm"]
        assert {p["pair_id"] for p in llm_after} == {p["pair_id"] for p in llm}
        assert all(p["status"] == "ok" and p["llm"] == "openai:stub-llm" for p in llm_after)
        assert json.loads(llm_after[0]["params"])["template"] == "distort_v1"

    # The distorting LLM is in the models table; the runs are recorded.
    assert store.query("SELECT kind FROM models WHERE model_id = 'openai:stub-llm'").to_pylist() == [{"kind": "distorter"}]
    assert store.query("SELECT count(*) AS n FROM runs WHERE flow = 'distort' AND status = 'completed'").to_pylist() == [{"n": 3}]

    # 4. The training set: the fixed contract models/train.py reads.
    out = write_training_set(None, ws, out=str(tmp_path / "train.parquet"))
    table = pq.read_table(out)
    assert table.schema.names == ["pair_id", "sample_id", "method", "images", "prompt", "target"]
    images_type = table.schema.field("images").type
    assert pa.types.is_list(images_type) and images_type.value_type == pa.string()
    ok = {p["pair_id"]: p for p in after if p["status"] == "ok"}
    assert table.num_rows == len(ok)
    paths = {r["image_id"]: r["path"] for r in store.query("SELECT image_id, path FROM images").to_pylist()}
    for r in table.to_pylist():
        p = ok[r["pair_id"]]
        assert r["prompt"] == rewrite_prompt(p["instruction"], p["distorted"]) and r["target"] == p["original"]
        sample_images = store.query("SELECT images FROM samples WHERE sample_id = ?", [r["sample_id"]]).to_pylist()
        assert r["images"] == [paths[i] for i in sample_images[0]["images"]]
        assert ("<image><|endofchunk|>" in r["prompt"]) == bool(r["images"])
    retrieve = [r for r in table.to_pylist() if r["method"] == "retrieve"]
    assert len(retrieve) == 6 and "bus: [0.100, 0.200, 0.800, 0.900]" in retrieve[0]["prompt"]

    only_llm = write_training_set(None, ws, where="p.method = 'llm'", format="datasets")
    import datasets

    ds = datasets.load_from_disk(only_llm)
    assert len(ds) == 3 and set(ds["method"]) == {"llm"}
    from lineage.store import PredicateError

    with pytest.raises(PredicateError, match=r"--where .* closes a parenthesis it did not open"):
        write_training_set(None, ws, where="true); DELETE FROM pairs; SELECT (1")
    with pytest.raises(PredicateError, match=r"--where .* is not a predicate over .*syntax error at or near \";\""):
        write_training_set(None, ws, where="true; DELETE FROM pairs")
    assert pairs(store) == after  # the smuggled DELETE never ran

    # The CLI: export to the default path; --where without an export is a user error, not a traceback.
    from typer.testing import CliRunner

    from polite.cli import app

    result = CliRunner().invoke(app, ["distort", "-w", ws, "--export-training-set", "-", "--where", "p.method = 'retrieve'"])
    assert result.exit_code == 0, result.output
    (written,) = (workspace.db_path.parent / "exports" / "training_set").glob("pairs-*.parquet")
    default = pq.read_table(written)
    assert default.num_rows == 6 and set(default.column("method").to_pylist()) == {"retrieve"}
    assert "wrote the training set (6 pairs) to" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["distort", "-w", ws, "--where", "true"])
    assert result.exit_code == 2 and "--where only applies" in result.output
    # a selection without a pair writes nothing and says so
    empty = CliRunner().invoke(app, ["distort", "-w", ws, "--export-training-set", str(tmp_path / "none.parquet"),
                                     "--where", "p.method = 'nothing'"])  # fmt: skip
    assert empty.exit_code == 2 and "no ok pairs match --where: nothing written" in empty.output, empty.output
    assert not (tmp_path / "none.parquet").exists()
    # a misspelt method stops before any flow run; a run that has nothing to do says so in words
    typo = CliRunner().invoke(app, ["distort", "-w", ws, "--method", "augmnt"])
    assert typo.exit_code == 2 and "--method augmnt: not a method; choose from llm, augment, retrieve" in typo.output
    made = CliRunner().invoke(app, ["distort", "-w", ws, "--method", "augment"])  # the demo config's variant
    assert made.exit_code == 0 and "distort augment: 11 samples selected, pairs 11 ok" in made.output, made.output
    done = CliRunner().invoke(app, ["distort", "-w", ws, "--method", "augment"])
    assert done.exit_code == 0, done.output
    assert "distort augment: 0 samples selected" in done.output and "nothing to do" in done.output


def test_bad_settings_fail_before_any_work(workspace):
    from flows.distort import distort_flow

    cfg = {"distort": {"mix": [{"method": "llm"}], "llm": {"backend": "local", "model": "/no/such/model"}}}
    with pytest.raises(ConfigError, match="no model folder"):
        distort_flow.fn(config=cfg, workspace=str(workspace.root))
    with pytest.raises(ConfigError, match="no distortion template"):
        distort_flow.fn(
            config={"distort": {"mix": [{"method": "llm"}], "llm": {"model": "m", "template": "nope"}}},
            workspace=str(workspace.root),
        )
    assert not workspace.db_path.exists() or LineageStore(workspace.db_path).query("SELECT * FROM runs").num_rows == 0


def test_retry_failed_with_a_count_redoes_the_failed_pairs_even_after_new_samples_arrive(workspace):
    """``--retry-failed`` redoes the failed pairs (docs/distort.md). With a ``count``, the work is the first
    samples in md5 order; new samples that sort before the failed ones (a nightly ingest) took their places,
    so the failed pairs were never retried once the count was reached."""
    import hashlib

    from flows.distort import select_work
    from polite.config import parse_config
    from tasks.distort.record import Pair, new_pair, pairs_to_table, variant_for

    store = seed_lineage(workspace)
    settings = parse_config(config("http://127.0.0.1:9/v1")).distort
    entry = next(e for e in settings.mix if e.method == "llm")  # llava, count 3
    variant = variant_for("llm", settings, 7, "openai:stub-llm")
    first = select_work(store, entry, settings, variant, retry_failed=False).to_pylist()
    assert len(first) == 3
    failed: list[Pair] = [new_pair(r, "llm", variant, 7, "distort-llm-v1").fail("HTTP 500") for r in first]
    table = pairs_to_table(failed)
    store.ingest_arrow("pairs", table.append_column("run_id", pa.array(["run_x"] * table.num_rows, pa.string())))
    # Two new samples that sort before every failed one in the count's md5 order.
    key = lambda sid: hashlib.md5(f"{sid}:{variant}".encode()).hexdigest()  # noqa: E731
    cutoff = min(key(r["sample_id"]) for r in first)
    new_ids = [sid for sid in (f"s_new_{i}" for i in range(400)) if key(sid) < cutoff][:2]
    assert len(new_ids) == 2
    store.ingest_arrow("samples", samples_to_table([
        Sample(sample_id=sid, source="llava", split="train", task_type="conversation", instruction="Q?",
               raw_response="A long and helpful answer. With two sentences.") for sid in new_ids
    ]))  # fmt: skip

    assert select_work(store, entry, settings, variant, retry_failed=False).num_rows == 0  # count reached
    retried = select_work(store, entry, settings, variant, retry_failed=True).column("sample_id").to_pylist()
    assert sorted(retried) == sorted(r["sample_id"] for r in first)



def test_a_changed_stop_or_local_dtype_makes_the_pairs_again_and_the_defaults_do_not(workspace):
    """stop (HTTP) and dtype/device (local) are in the variant only off their old defaults: pairs made with
    the defaults stay made, and a change selects the same samples again, as new pairs beside the old."""
    from flows.distort import select_work
    from polite.config import parse_config
    from tasks.distort.record import new_pair, pairs_to_table, variant_for

    store = seed_lineage(workspace)
    raw = config("http://127.0.0.1:9/v1")

    def settings_with(**llm):
        cfg = json.loads(json.dumps(raw))
        cfg["distort"]["llm"].update(llm)
        return parse_config(cfg).distort

    for llm, identity, changed in [
        ({}, "openai:stub-llm", {"stop": ["\n"]}),
        ({"backend": "local", "model": "tiny"}, "hf:tiny@0123456789", {"dtype": "bfloat16"}),
        ({"backend": "local", "model": "tiny"}, "hf:tiny@0123456789", {"device": "cuda"}),
    ]:
        settings = settings_with(**llm)
        entry = next(e for e in settings.mix if e.method == "llm")  # llava, count 3
        variant = variant_for("llm", settings, 7, identity)
        work = select_work(store, entry, settings, variant, retry_failed=False).to_pylist()
        if work:  # the local settings share their variant with each other: made once
            made = [new_pair(r, "llm", variant, 7, "distort-llm-v1") for r in work]
            for pair in made:
                pair.distorted = "short."
            table = pairs_to_table(made)
            store.ingest_arrow("pairs", table.append_column("run_id", pa.array(["run_x"] * len(made), pa.string())))
        assert select_work(store, entry, settings, variant, retry_failed=False).num_rows == 0
        # The explicit old defaults are the defaults.
        same = settings_with(**llm, **({"stop": ["### Human:"]} if not llm else {"dtype": "float32", "device": "cpu"}))
        assert variant_for("llm", same, 7, identity) == variant
        other = settings_with(**llm, **changed)
        new_variant = variant_for("llm", other, 7, identity)
        assert new_variant != variant, changed
        assert select_work(store, entry, other, new_variant, retry_failed=False).num_rows == 3, changed


def test_export_training_set_with_a_misspelt_column_is_a_user_error(workspace):
    """``--where`` is bound against the lineage before the export, as every other command's predicate is: a
    typo stops with the columns it may have meant and exit code 2, not a DuckDB traceback."""
    from typer.testing import CliRunner

    from polite.cli import app

    seed_lineage(workspace)
    ws = str(workspace.root)
    result = CliRunner().invoke(app, ["distort", "-w", ws, "--export-training-set", "-", "--where", "p.methd = 'llm'"])
    assert result.exit_code == 2, result.output
    assert "--where" in result.output and "method" in result.output


def test_a_method_the_mix_does_not_have_is_a_config_error_not_a_silent_no_op(workspace):
    """``polite distort --method llm`` without a config whose mix has an llm entry made nothing and said
    ``{"shards": 0}``, as if every pair were already made."""
    from flows.distort import distort_flow

    with pytest.raises(ConfigError, match=r"\['llm'\].*augment, retrieve"):
        distort_flow.fn(config={"seed": 1}, workspace=str(workspace.root), methods=["llm"])
    assert not workspace.db_path.exists() or LineageStore(workspace.db_path).query("SELECT * FROM runs").num_rows == 0


@pytest.mark.parametrize("mode", ["401", "404", "closed"])
def test_an_llm_server_that_refuses_every_request_stops_the_stage_before_any_pair(prefect_harness, workspace, mode):
    """A wrong key, model or address would fail every llm pair after its retries, and the failures would count
    as made: one test request finds it first, and the stage stops with what to fix. A failing server (500) is
    not refused: its pairs fail and are retried later (test_distort_flow_resumes_retries_and_exports)."""
    from flows.distort import distort_flow
    from polite.config import ConfigError

    store = seed_lineage(workspace)
    with StubChatServer() as server:
        url = server.url(mode) if mode != "closed" else "http://127.0.0.1:9/v1"
        cfg = config(url)
        cfg["distort"]["llm"]["api_key_env"] = "POLITE_TEST_KEY"
        message = {"401": "HTTP 401.*is POLITE_TEST_KEY set", "404": "HTTP 404", "closed": "no server answers"}[mode]
        with pytest.raises(ConfigError, match=message):
            distort_flow(config=cfg, workspace=str(workspace.root), methods=["llm"])
        if mode != "closed":
            assert server.requests[mode] == 1  # the test request only, not one per pair and retry
    assert store.query("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 0}]
