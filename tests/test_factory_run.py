"""`polite run`: configs validate up front, the dry-run plan, overrides, and the whole factory resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from polite.cli import app
from polite.cli.factory import apply_overrides
from polite.config import FactoryConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_demo_yaml_is_the_no_argument_config():
    from flows.factory import demo_config, resolve_config

    assert load_config(CONFIGS / "demo.yaml") == demo_config() == resolve_config(None)
    # the demo changes exactly two sections of the defaults: fixed training steps, longer rewrites
    defaults = FactoryConfig()
    assert demo_config().model_copy(update={"rewrite": defaults.rewrite, "train": defaults.train}) == defaults


def test_stage_commands_without_a_config_run_the_demo_config_too():
    """`polite rewrite --retry-failed` after `polite run` must work on the demo's rewrites: the same settings, so
    the same key (the built-in defaults would rewrite everything again at 1024 new tokens)."""
    from flows.factory import demo_config
    from polite.cli.common import stage_config
    from polite.cli.rewrite import _config

    assert stage_config(None) == demo_config() != FactoryConfig()
    assert stage_config(str(CONFIGS / "pf1m.yaml")) == load_config(CONFIGS / "pf1m.yaml")
    assert (
        _config(None, None, [])["rewrite"] == demo_config().model_dump(mode="json", by_alias=True)["rewrite"]
    )
    beams = _config(None, "paper", ["rewrite.shard_size=8"])["rewrite"]
    assert (beams["preset"], beams["shard_size"], beams["overrides"]["max_new_tokens"]) == ("paper", 8, 224)


@pytest.mark.parametrize("name", ["demo.yaml", "pf1m.yaml", "nightly.yaml"])
def test_every_shipped_config_validates(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.ingest.sources


def test_pf1m_dry_run_prints_the_plan_without_data_or_weights(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from flows.factory import plan

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # none cached

    p = plan(load_config(CONFIGS / "pf1m.yaml"))
    assert p["stages"] == [
        "ingest",
        "rewrite",
        "filter",
        "export",
    ]  # distort/train off: the released rewriter
    vqa = next(s for s in p["sources"] if s["adapter"] == "vqav2")
    assert (vqa["from"], vqa["rows"], vqa["shards"]) == (
        "lmms-lab/VQAv2",
        214_354,
        108,
    )  # estimated, 2000/shard
    assert vqa["rows_from"].startswith("estimated")
    rewriter = next(m for m in p["models"] if m["role"] == "rewriter")
    assert rewriter["model"] == "/models/polite-flamingo" and rewriter["where"].startswith("ABSENT")
    assert p["runner"]["rewrite"] == "RayTaskRunner" and p["runner"]["ingest"] == "ThreadPoolTaskRunner"
    # what would stop the real run here, each naming its setting: the plan prints, and the dry run exits 2
    llava = next(s for s in p["sources"] if s["adapter"] == "llava_instruct")
    assert llava["rows_from"] == "ABSENT on this machine"
    assert p["problems"][:2] == [
        "ingest.sources.10 (llava_instruct): from /data/llava-instruct: no such file or folder",
        "rewrite.model: rewriter '/models/polite-flamingo': no model folder at '/models/polite-flamingo'",
    ]
    # the tests run with HF_HUB_OFFLINE=1: the scorers it lets filter download cannot be (tests/test_ops_output.py)
    assert [problem.split(":")[0] for problem in p["problems"][2:]] == [
        "filters.semantic.model", "filters.nli.model", "filters.reward.model", "filters.clipscore.pretrained",
    ]  # fmt: skip
    result = CliRunner().invoke(app, ["run", "--config", str(CONFIGS / "pf1m.yaml"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "dry run" in result.output and "vqav2" in result.output
    said = " ".join(result.output.split())
    assert "error: the run would stop on this machine: ingest.sources.10 (llava_instruct)" in said
    assert "Traceback" not in result.output


def test_overrides_apply_before_validation_and_bad_values_fail_with_the_key():
    data = apply_overrides(
        {"ingest": {"sources": [{"adapter": "demo"}]}},
        ["rewrite.preset=beam", "ingest.sources.0.limit=5", "export.formats=[pf1m]"],
    )
    assert data["rewrite"] == {"preset": "beam"} and data["ingest"]["sources"][0]["limit"] == 5
    assert data["export"]["formats"] == ["pf1m"]
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["rewrite.preset"])
    result = CliRunner().invoke(app, ["run", "--set", "rewrite.preset=nope", "--dry-run"])
    assert result.exit_code == 2 and "rewrite.preset" in result.output


def test_a_misspelt_device_is_a_config_error_in_every_stage():
    """'gpu' would fail every shard at model load, after the work was written: the config refuses it."""
    from polite.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"rewrite": {"device": "gpu"}, "train": {"device": "cuda1"}, "filters": {"device": "GPU"},
                      "distort": {"llm": {"backend": "local", "model": "m", "device": "auto"}}})  # fmt: skip
    message = str(info.value)
    for key, value in (("rewrite", "gpu"), ("train", "cuda1"), ("filters", "GPU"), ("distort.llm", "auto")):
        assert f"{key}.device: Value error, '{value}' is not a torch device" in message
    cfg = parse_config({"rewrite": {"device": "auto"}, "train": {"device": "cuda:1"}, "filters": {"device": "cpu"}})
    assert (cfg.rewrite.device, cfg.train.device, cfg.filters.device) == (None, "cuda:1", "cpu")  # auto: the default
    result = CliRunner().invoke(app, ["run", "--set", "rewrite.device=gpu", "--dry-run"])
    assert result.exit_code == 2 and "rewrite.device" in result.output and "Traceback" not in result.output


def test_a_misspelt_key_names_the_key_it_meant_and_the_known_ones():
    from polite.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"rewrit": {}, "rewrite": {"batch_size": 8}, "ingest": {"sources": [{"adapter": "demo", "limt": 3}]},
                      "filters": {"semantic": {"treshold": 0.5}}})  # fmt: skip
    message = str(info.value)
    assert "  - rewrit: unknown key; did you mean 'rewrite'? (known here: distort, export," in message
    assert "  - rewrite.batch_size: unknown key; did you mean 'max_batch_size'?" in message
    assert (
        "  - ingest.sources.0.limt: unknown key; did you mean 'limit'? (known here: adapter, config_name, from,"
        in message
    )
    assert "  - filters.semantic.treshold: unknown key; did you mean 'threshold'?" in message
    result = CliRunner().invoke(app, ["run", "--set", "rewrite.zzz=1", "--dry-run"])
    assert result.exit_code == 2 and "rewrite.zzz: unknown key (known here: backend," in result.output


@pytest.mark.slow
def test_factory_runs_every_stage_as_subflows_and_a_rerun_skips_finished_work(tmp_path, prefect_harness):
    """Tiny random rewriter given (training is the demo's and train's own tests' job); 8 demo scenes."""
    from flows.factory import factory_flow
    from lineage.store import LineageStore
    from models.tiny import make_tiny_rewriter

    model = make_tiny_rewriter(tmp_path / "tiny")
    ws = str(tmp_path / "ws")
    config = {
        "ingest": {"sources": [{"adapter": "demo", "options": {"scenes": 8}}]},
        "rewrite": {"overrides": {"max_new_tokens": 12}},
        "export": {"formats": ["pf1m"], "checks": {"min_keep_rate": None}},
    }
    # A random rewriter's output is dropped by the filters, so export every decided rewrite here.
    first = factory_flow(config=config, workspace=ws, model=str(model), where="kept IS NOT NULL")
    assert list(first["stages"]) == ["ingest", "distort", "rewrite", "filter", "export"]
    store = LineageStore(Path(ws) / "lineage.duckdb")
    runs = store.query("SELECT flow, status, parent_run_id FROM runs ORDER BY started_at").to_pylist()
    assert runs[0] == {"flow": "factory", "status": "completed", "parent_run_id": None}
    assert [(r["flow"], r["parent_run_id"]) for r in runs[1:]] == [
        (s, first["run_id"]) for s in ("ingest", "distort", "rewrite", "filter", "export")
    ]
    counts = (
        "SELECT (SELECT count(*) FROM samples) s, (SELECT count(*) FROM pairs) p, "
        "(SELECT count(*) FROM rewrites) r, (SELECT count(*) FROM decisions) d, (SELECT count(*) FROM exports) e"
    )
    before = store.query(counts).to_pylist()[0]
    assert (
        before["s"] == 48  # 8 scenes x (description + 2 polite answers + 2 VQA + caption)
        and before["r"] == first["stages"]["rewrite"]["ok"] > 0
        and before["d"] == before["r"]
    )
    assert first["stages"]["export"]["n_items"] == before["r"]
    # the dataset card names the thresholds, stored once per settings hash (decision_settings), for every item
    (card,) = list((Path(ws) / "exports").glob("pf1m-*/README.md"))
    (settings,) = store.query("SELECT thresholds FROM decision_settings").to_pylist()
    assert f"- {before['r']} items decided with: `{settings['thresholds']}`" in card.read_text()

    second = factory_flow(config=config, workspace=ws, model=str(model), where="kept IS NOT NULL")
    assert second["stages"]["ingest"]["new_samples"] == 0
    assert second["stages"]["rewrite"]["selected"] == 0
    assert second["stages"]["export"]["exports"] == first["stages"]["export"]["exports"]
    assert store.query(counts).to_pylist()[0] == before


@pytest.mark.parametrize(
    ("pair", "says"),
    [
        ("ingest.sources.5=1", "5 is not an index of a 1-item list"),
        ("ingest.sources.5.limit=1", "5 is not an index of a 1-item list"),
        ("ingest.sources.x=1", "x is not an index of a 1-item list"),
        ("rewrite.overrides={a", "is not valid YAML"),
    ],
)
def test_a_bad_set_is_one_line_naming_the_pair(pair, says):
    result = CliRunner().invoke(app, ["run", "--set", pair, "--dry-run"])
    assert result.exit_code == 2, result.output
    assert says in result.output and f"--set {pair!r}" in result.output and "Traceback" not in result.output


def test_export_options_and_predicates_fail_before_any_stage_runs(tmp_path, monkeypatch):
    """A misspelt --format or a --where / export.where / train.pairs_where naming no column stops `polite run`
    (and `polite export`) with one line before a flow starts: found only by the export stage, it would cost
    the whole run first. A fresh workspace binds against an empty lineage of the same schema and stays empty."""
    import flows.factory

    def no_flow(**kwargs):
        raise AssertionError("a flow started")

    monkeypatch.setattr(flows.factory, "factory_flow", no_flow)
    monkeypatch.setattr("flows.export.export_flow", no_flow)
    ws = tmp_path / "ws"
    cases = [
        (
            ["run", "--format", "jsonl"],
            "export.formats.0: Input should be 'datasets', 'parquet', 'pf1m' or 'llava'",
        ),
        (["export", "--format", "jsonl"], "export.formats.0: Input should be"),
        (
            ["run", "--where", "kept AND sorce = 'gqa'"],
            "export.where (--where) \"kept AND sorce = 'gqa'\" is not",
        ),
        (
            ["run", "--set", "export.where=nokept"],
            "export.where (--where) 'nokept' is not a predicate over lineage",
        ),
        (
            ["run", "--set", "train.pairs_where=s.sorce = 'demo'"],
            "train.pairs_where \"s.sorce = 'demo'\" is not",
        ),
    ]
    for args, says in cases:
        for dry in ([], ["--dry-run"]) if args[0] == "run" else ([],):
            result = CliRunner().invoke(app, [*args, *dry, "-w", str(ws)])
            assert result.exit_code == 2, (args, result.output)
            assert says in " ".join(result.output.split()), (args, result.output)
            assert "Traceback" not in result.output
    assert not ws.exists()  # a dry run writes nothing, and neither does a refused run
    # a predicate that binds passes
    result = CliRunner().invoke(
        app, ["run", "--where", "kept AND source = 'demo'", "--dry-run", "-w", str(ws)]
    )
    assert result.exit_code == 0, result.output


def test_the_plan_names_the_lineage_rewriter_when_nothing_trains_or_is_given():
    """configs/nightly.yaml trains nothing and sets no model: the rewrite stage takes the latest rewriter in the
    lineage, and the plan must not say one is trained in this run."""
    from flows.factory import plan

    p = plan(load_config(CONFIGS / "nightly.yaml"))
    assert "train" not in p["stages"] and "latest rewriter" in p["rewriter"], p["rewriter"]
    assert plan(load_config(CONFIGS / "demo.yaml"))["rewriter"].startswith("trained in this run")


def test_polite_ingest_refuses_a_bad_source_before_a_flow_starts(tmp_path, monkeypatch):
    """An unknown adapter or a generic source without a mapping: one line, and no Prefect traceback from inside
    a flow run (the flow used to start, log the traceback, then fail)."""

    class NoFlow:
        def with_options(self, **kwargs):
            raise AssertionError("a flow started")

    monkeypatch.setattr("flows.ingest.ingest_flow", NoFlow())
    ws = str(tmp_path / "ws")
    for args, says in [
        (["ingest", "vqa2"], "ingest.sources.0: Value error, unknown adapter 'vqa2'; known: demo, generic"),
        (["ingest", "generic", "--from", str(tmp_path)], "the generic adapter needs a `mapping`"),
    ]:
        result = CliRunner().invoke(app, [*args, "-w", ws])
        assert result.exit_code == 2, (args, result.output)
        assert says in result.output and "Traceback" not in result.output, (args, result.output)


def test_a_missing_rewriter_stops_polite_run_before_any_stage(tmp_path, monkeypatch):
    """`--model` naming no folder, or a config that trains nothing in a workspace with no rewriter yet (the
    nightly run's first night): the rewrite stage would find out only after ingest and distort had run, which
    on PF-1M is hours (and the filter stage, its scorers, only after the rewrites). `polite run` says so in one
    line before a flow starts, and writes nothing."""
    import flows.factory

    def no_flow(**kwargs):
        raise AssertionError("a flow started")

    monkeypatch.setattr(flows.factory, "factory_flow", no_flow)
    ws = tmp_path / "ws"
    cases = [
        (["run", "--model", str(tmp_path / "nope")], "no model folder at"),
        (["run", "--set", "train.enabled=false"], "no rewriter in the lineage yet"),
        (["run", "--set", "train.base=/models/absent-base"], "/models/absent-base"),
        # a scorer enabled explicitly whose model is not here: found by the filter stage after the rewrites
        (
            ["run", "--set", "filters.nli.enabled=true", "--set", "filters.nli.model=/models/absent-nli"],
            "filters.nli is enabled but no model folder at /models/absent-nli",
        ),
        (
            ["run", *[f"--set=filters.{name}.enabled=false" for name in ("rouge", "length", "unchanged", "repetition",
             "truncated", "answer", "semantic", "nli", "clipscore", "reward")]],  # fmt: skip
            "every scorer is disabled",
        ),
    ]
    for args, says in cases:
        result = CliRunner().invoke(app, [*args, "-w", str(ws)])
        assert result.exit_code == 2, (args, result.output)
        assert says in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert not ws.exists()
    # training needs a local workspace: a remote one stops the run before ingest, not after it
    monkeypatch.setenv("POLITE_DB_DIR", str(tmp_path / "db"))
    result = CliRunner().invoke(app, ["run", "-w", "memory://polite-factory-test"])
    assert result.exit_code == 2 and "is not a local workspace" in result.output, result.output
    # the dry run still prints the plan where the weights are absent (it says ABSENT), then exits 2: the real
    # run would stop at once
    result = CliRunner().invoke(app, ["run", "--model", str(tmp_path / "nope"), "--dry-run", "-w", str(ws)])
    assert result.exit_code == 2 and "ABSENT" in result.output, result.output
    assert "would stop on this machine: --model: rewriter" in " ".join(result.output.split())
    assert not ws.exists()


def test_the_factory_flow_checks_the_rewriter_before_any_stage(tmp_path, monkeypatch, prefect_harness):
    """The same check inside the flow, for deployment runs (the nightly schedule) that skip the command line."""
    from flows.factory import factory_flow
    from polite.config import ConfigError

    class NoFlow:
        def with_options(self, **kwargs):
            raise AssertionError("a stage started")

    for stage in ("ingest", "distort"):
        monkeypatch.setattr(f"flows.{stage}.{stage}_flow", NoFlow())
    config = {"ingest": {"sources": [{"adapter": "demo", "options": {"scenes": 2}}]}, "train": {"enabled": False}}
    with pytest.raises(ConfigError, match="no rewriter in the lineage yet"):
        factory_flow(config=config, workspace=str(tmp_path / "ws"))
    with pytest.raises(ConfigError, match="no model folder at"):
        factory_flow(config=config, workspace=str(tmp_path / "ws"), model=str(tmp_path / "nope"))
    assert not (tmp_path / "ws").exists()  # a refused deployment run leaves no workspace behind


def _no_flow(monkeypatch):
    """`polite run` must stop before the factory flow starts."""
    import flows.factory

    def no_flow(**kwargs):
        raise AssertionError("a flow started")

    monkeypatch.setattr(flows.factory, "factory_flow", no_flow)


def _local_source(tmp_path, **mapping) -> dict:
    """A generic source over a two-row JSONL file (its images need not exist: only columns are checked)."""
    data = tmp_path / "data" / "data.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text('{"qid": "a", "image": "a.png", "question": "What?", "answer": "red"}\n'
                    '{"qid": "b", "image": "b.png", "question": "Which?", "answer": "blue"}\n')  # fmt: skip
    columns = {"task_type": "vqa", "key": "qid", "image": "image", "instruction": "question", "response": "answer"}
    return {"adapter": "generic", "name": "mine", "from": str(data), "mapping": {**columns, **mapping}}


def _config_file(tmp_path, config: dict) -> str:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_bad_source_stops_polite_run_and_its_dry_run_before_any_work(tmp_path, monkeypatch):
    """A mapped column the data lacks, a `from` that is not there, a bad demo option: `polite run` used to record
    a failed factory run first (the ingest stage found them), and the dry run exited 0. Now both stop with one
    line naming the source's key; the run starts no flow and a missing file writes nothing."""
    _no_flow(monkeypatch)
    ws = tmp_path / "ws"
    cases = [
        ({"ingest": {"sources": [{"adapter": "demo"}, {**_local_source(tmp_path), "from": str(tmp_path / "nope.jsonl")}]}},
         f"ingest.sources.1 (mine): from {tmp_path / 'nope.jsonl'}: no such file or folder"),
        ({"ingest": {"sources": [{"adapter": "demo", "options": {"scenes": -3}}]}},
         "ingest.sources.0 (demo): demo: option scenes must be a whole number >= 1, got -3"),
        # opened (the demo generated, the file converted into the workspace's datasets cache), then refused
        ({"ingest": {"sources": [{"adapter": "demo"}, _local_source(tmp_path, response="answr")]}},
         "ingest.sources.1 (mine): source 'mine' (generic adapter, "),
    ]  # fmt: skip
    for config, says in cases:
        path = _config_file(tmp_path, {**config, "train": {"enabled": False}})
        for dry in (["--dry-run"], []):
            result = CliRunner().invoke(app, ["run", "-c", path, "--model", str(_fake_model(tmp_path)), *dry,
                                              "-w", str(ws)])  # fmt: skip
            assert result.exit_code == 2, (config, dry, result.output)
            assert says in " ".join(result.output.split()), (dry, result.output)
            assert "Traceback" not in result.output
            assert not (ws / "lineage.duckdb").exists()  # no run recorded
        if "answr" not in str(config):
            assert not ws.exists()  # a missing file, a bad option, a dry run: nothing written


def test_the_factory_flow_checks_its_sources_before_it_records_a_run(tmp_path, prefect_harness):
    """The same for deployment runs, which skip the command line: no `factory` run is recorded."""
    from flows.factory import factory_flow
    from lineage.store import LineageStore
    from polite.config import ConfigError

    ws = tmp_path / "ws"
    config = {"ingest": {"sources": [_local_source(tmp_path, response="answr")]}, "train": {"enabled": False}}
    with pytest.raises(ConfigError, match=r"ingest.sources.0 \(mine\): .*column\(s\) \['answr'\] not found"):
        factory_flow(config=config, workspace=str(ws), model=str(_fake_model(tmp_path)))
    db = ws / "lineage.duckdb"
    assert not db.exists() or LineageStore(db).query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]


def _fake_model(tmp_path, positions: int = 2048):
    """A model folder the checks can read (flamingo.json and the LM's config), without weights."""
    import json

    folder = tmp_path / f"model-{positions}"
    (folder / "lm").mkdir(parents=True, exist_ok=True)
    (folder / "lm" / "config.json").write_text(json.dumps({"max_position_embeddings": positions}))
    (folder / "flamingo.json").write_text(json.dumps({"lm": "lm"}))
    return folder


def test_missing_model_and_adapter_paths_stop_the_run_naming_their_key(tmp_path, monkeypatch):
    """train.init_adapter was found by the training step after ingest and distortion, as six tracebacks; the
    rewriter and base errors did not say which setting named the path."""
    _no_flow(monkeypatch)
    ws = tmp_path / "ws"
    cases = [
        (["--set", f"train.init_adapter={tmp_path / 'nope'}"],
         f"train.init_adapter: no LoRA adapter folder at {tmp_path / 'nope'}"),
        (["--set", f"rewrite.model={tmp_path / 'nope'}"], "rewrite.model: rewriter"),
        (["--model", str(tmp_path / "nope")], "--model: rewriter"),
        (["--set", f"train.base={tmp_path / 'nope'}"], f"train.base: no model spec at {tmp_path / 'nope'}"),
        (["--set", "train.enabled=false"], "rewrite.model: no rewriter in the lineage yet"),
    ]  # fmt: skip
    for args, says in cases:
        for dry in ([], ["--dry-run"]):
            result = CliRunner().invoke(app, ["run", *args, *dry, "-w", str(ws)])
            assert result.exit_code == 2, (args, dry, result.output)
            assert says in " ".join(result.output.split()), (args, dry, result.output)
            assert "Traceback" not in result.output
    assert not ws.exists()


def test_a_prompt_budget_past_the_rewriters_context_is_refused_before_any_work(tmp_path, monkeypatch):
    """max_prompt_tokens + max_new_tokens past the model's positions decoded garbage stored as ok rewrites."""
    _no_flow(monkeypatch)
    model = str(_fake_model(tmp_path, positions=512))
    ws = str(tmp_path / "ws")
    for dry in ([], ["--dry-run"]):
        result = CliRunner().invoke(app, ["run", "--model", model, "--set", "rewrite.max_prompt_tokens=400", *dry,
                                          "-w", ws])  # fmt: skip
        said = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert ("rewrite.max_prompt_tokens 400 + max_new_tokens 224 = 624 exceed the rewriter's context of 512 "
                f"positions (--model {model}): set rewrite.max_prompt_tokens to at most 288") in said, said  # fmt: skip
    # the tiny base trained in this run has 2048 positions
    result = CliRunner().invoke(app, ["run", "--set", "rewrite.max_prompt_tokens=4000", "--dry-run", "-w", ws])
    assert result.exit_code == 2 and "context of 2048 positions (the tiny base" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["run", "--model", model, "--set", "rewrite.max_prompt_tokens=288",
                                      "--dry-run", "-w", ws])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_misspelt_source_to_select_names_the_known_ones(tmp_path, monkeypatch):
    """rewrite.sources, rewrite.exclude_sources and distort.mix[].sources naming no source selected (or excluded)
    nothing, silently. Known: the
    config's ingest sources and the sources already in the lineage."""
    from flows.factory import stages_to_run
    from flows.preflight import check_source_names
    from lineage.store import LineageStore
    from polite.config import ConfigError, parse_config
    from polite.workspace import Workspace

    _no_flow(monkeypatch)
    ws = tmp_path / "ws"
    for args, says in [
        (["--set", "rewrite.sources=[demoo]"], "rewrite.sources: unknown source 'demoo' (did you mean 'demo'?)"),
        (["--set", "rewrite.exclude_sources=[demoo]"],
         "rewrite.exclude_sources: unknown source 'demoo' (did you mean 'demo'?)"),
        (["--set", "distort.mix=[{method: augment, sources: [demoo]}]"],
         "distort.mix.0.sources: unknown source 'demoo' (did you mean 'demo'?); known: demo"),
    ]:  # fmt: skip
        for dry in ([], ["--dry-run"]):
            result = CliRunner().invoke(app, ["run", *args, *dry, "-w", str(ws)])
            assert result.exit_code == 2, (args, result.output)
            assert says in " ".join(result.output.split()), (args, result.output)
    assert not ws.exists()
    # a source only the lineage knows (ingested by an earlier config) is a source to select
    store = LineageStore(ws / "lineage.duckdb")
    store.migrate()
    with store.writer() as con:
        con.execute("INSERT INTO samples (sample_id, source, status) VALUES ('s_1', 'gqa', 'ok')")
    cfg = parse_config({"rewrite": {"sources": ["gqa", "demo"]}})
    check_source_names(cfg, Workspace.resolve(str(ws)), stages_to_run(cfg, None))
    with pytest.raises(ConfigError, match="known: demo, gqa"):
        cfg = parse_config({"rewrite": {"sources": ["gqb"]}})
        check_source_names(cfg, Workspace.resolve(str(ws)), stages_to_run(cfg, None))


def test_the_nightly_dry_run_on_a_fresh_workspace_says_the_run_would_stop(tmp_path):
    """configs/nightly.yaml on a new machine: its folder is not here and no rewriter is in the lineage. The dry
    run said OK (the folder as 'unknown split size'); the real run stops at once."""
    from flows.factory import plan

    ws = tmp_path / "ws"
    p = plan(load_config(CONFIGS / "nightly.yaml"), str(ws))
    assert p["sources"][0]["rows_from"] == "ABSENT on this machine"
    assert p["problems"] == [
        "ingest.sources.0 (incoming): from /data/incoming: no such file or folder",
        "rewrite.model: no rewriter in the lineage yet: train one (`polite train-rewriter`) or pass --model PATH",
    ]
    result = CliRunner().invoke(app, ["run", "-c", str(CONFIGS / "nightly.yaml"), "--dry-run", "-w", str(ws)])
    assert result.exit_code == 2 and "no rewriter in the lineage yet" in result.output, result.output
    assert not ws.exists()
