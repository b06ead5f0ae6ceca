"""What the commands print: a dry run tells the truth about Hub models when the hub is offline (and fails like
its other problems), its tables keep whole values when stdout is not a terminal, and libraries' progress bars
and open_clip's random-weights notes stay out of logs no one watches."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polite.cli import app

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
NOT_CACHED = "polite-tests/no-such-nli-model"  # a Hub id no cache holds
OFFLINE_NLI = ["--set", "filters.allow_download=true", "--set", "filters.nli.enabled=true",
               "--set", f"filters.nli.model={NOT_CACHED}"]  # fmt: skip


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """No model in the Hugging Face cache, whatever this machine has downloaded before."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _said(output: str) -> str:
    return " ".join(output.split())


def test_an_offline_hub_makes_a_missing_hub_model_a_problem_of_the_dry_run_not_a_download(
    monkeypatch, tmp_path, empty_hub_cache
):
    """HF_HUB_OFFLINE=1 with filters.allow_download: the dry run said "downloaded on first use" and passed; the
    real run then failed in the filter stage, after every stage before it. Now the plan says the model is
    missing and cannot be fetched, the dry run exits 2 naming the setting, and so does the run itself, before
    any stage. With the hub online the same config plans a download, and passes."""
    from flows.factory import plan
    from polite.cli.factory import read_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ws = tmp_path / "ws"
    cfg = read_config(None, OFFLINE_NLI[1::2], None, None, None)
    planned = plan(cfg, str(ws))
    nli = next(m for m in planned["models"] if m["role"] == "filter nli")
    assert nli["where"] == "Hub id, NOT in the local cache, and HF_HUB_OFFLINE is set: cannot be downloaded"
    problem = next(p for p in planned["problems"] if p.startswith("filters.nli.model"))
    assert problem == (
        f"filters.nli.model: {NOT_CACHED} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so the "
        "filter stage cannot download it and would fail; unset HF_HUB_OFFLINE, or point filters.nli.model at a "
        "local copy"
    )
    # an `auto` scorer is no problem: offline, the chain skips it as when downloads are off, and says so
    assert not [p for p in planned["problems"] if p.startswith("filters.reward.model")]
    reward = next(m for m in planned["models"] if m["role"] == "filter reward")
    assert reward["where"].endswith("cannot be downloaded; auto: skipped when not available"), reward
    # the missing nli model does not hide another scorer's problem (the chain would stop on nli first)
    missing = tmp_path / "no-weights.safetensors"
    both = plan(read_config(None, [*OFFLINE_NLI[1::2], "filters.clipscore.enabled=true",
                                   f"filters.clipscore.pretrained={missing}"], None, None, None), str(ws))  # fmt: skip
    filters_problems = [p for p in both["problems"] if p.startswith("filters")]
    assert len(filters_problems) == 2 and filters_problems[0].startswith("filters.nli.model:"), filters_problems
    assert f"no weights file at {missing}" in filters_problems[1], filters_problems

    dry = CliRunner().invoke(app, ["run", "--dry-run", "-w", str(ws), *OFFLINE_NLI])
    assert dry.exit_code == 2, dry.output
    assert "downloaded on first use" not in dry.output
    assert f"filters.nli.model: {NOT_CACHED} is not in the local Hugging Face cache" in _said(dry.output)
    run = CliRunner().invoke(app, ["run", "-w", str(ws), *OFFLINE_NLI])
    assert run.exit_code == 2 and "HF_HUB_OFFLINE is set" in run.output, run.output
    assert not ws.exists()  # refused before anything was written
    scored = CliRunner().invoke(app, ["filter", "-w", str(ws), "--set", "allow_download=true",
                                      "--set", "nli.enabled=true", "--set", f"nli.model={NOT_CACHED}"])  # fmt: skip
    assert scored.exit_code == 2 and "HF_HUB_OFFLINE is set" in scored.output, scored.output

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    online = plan(cfg, str(ws))
    assert next(m for m in online["models"] if m["role"] == "filter nli")["where"] == "Hub id, downloaded on first use"
    assert not [p for p in online["problems"] if p.startswith("filters.")]
    assert CliRunner().invoke(app, ["run", "--dry-run", "-w", str(ws), *OFFLINE_NLI]).exit_code == 0


def test_the_plan_says_whether_a_hub_model_is_cached_and_what_downloads_off_means(tmp_path, empty_hub_cache):
    from flows.factory import plan
    from polite.cli.factory import read_config

    cfg = read_config(None, ["filters.nli.enabled=auto", f"filters.nli.model={NOT_CACHED}"], None, None, None)
    nli = next(m for m in plan(cfg, str(tmp_path / "ws"))["models"] if m["role"] == "filter nli")
    assert nli["where"] == "Hub id, NOT in the local cache (downloads are off); auto: skipped when not available"


def test_dry_run_tables_keep_whole_values_when_stdout_is_not_a_terminal(tmp_path, empty_hub_cache):
    """Piped or in CI, rich assumed 80 columns and cut every long cell (`lmms-l…`, `sentence-transformers/all-…`):
    the plan of the paper's config lost its dataset ids, model ids and paths."""
    ws = tmp_path / "a-workspace-folder-with-a-name-long-enough-to-pass-eighty-columns-on-its-own"
    result = CliRunner().invoke(app, ["run", "--config", str(CONFIGS / "pf1m.yaml"), "--dry-run", "-w", str(ws)])
    assert result.exit_code == 2, result.output  # pf1m's data and weights are not here
    assert "…" not in result.output, result.output
    lines = result.output.splitlines()
    assert f"workspace: {ws}" in lines
    for whole in ("lmms-lab/COCO-Caption2017", "train_balanced_instructions", "limit (split size unknown)",
                  "sentence-transformers/all-mpnet-base-v2", "OpenAssistant/reward-model-deberta-v3-large-v2"):  # fmt: skip
        assert any(whole in line for line in lines), whole
    vqa = next(line for line in lines if line.startswith("│ vqav2 "))
    assert "lmms-lab/VQAv2" in vqa and "estimated (dataset card)" in vqa and "108" in vqa  # one row, one line


def test_on_a_terminal_the_plan_still_fits_the_window():
    from rich.console import Console
    from rich.table import Table

    from polite.cli.common import print_wide

    table = Table()
    table.add_column("model")
    table.add_row("x" * 150)
    terminal = Console(force_terminal=True, width=60, record=True)
    print_wide(table, terminal)
    assert max(len(line) for line in terminal.export_text().splitlines()) <= 60
    piped = Console(force_terminal=False, width=60, record=True)
    print_wide(table, piped)
    assert "x" * 150 in piped.export_text() and piped.width == 60  # widened for the table only


def test_the_stages_own_tables_print_whole_when_piped(capsys):
    from filters.funnel import render
    from flows.ingest import print_summary

    label = "lmms-lab/COCO-Caption2017 (train, adapter coco_caption, a long enough label)"
    print_summary({"sources": {label: {"rows": 1200, "ok": 1200, "duplicates": 3, "new_samples": 1197,
                                        "duplicate_ids": ["s_1", "s_2", "s_3"]}}})
    render([{"source": label, "scorer": "semantic_similarity", "entered": 1200, "dropped": 5, "kept": 1195}], [],
           [{"scorer": "nli", "why": "not available locally", "enable_with": "filters.nli.model: /path"}])  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│ ") and label in line]
    assert len(rows) == 2 and "duplicates" in out and "semantic_similarity" in rows[1], out  # ingest, funnel
    assert "…" not in out, out
    assert "skipped nli: not available locally; enable with `filters.nli.model: /path`" in out, out


def _env_without_bar_switches() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}  # fmt: skip


def test_library_progress_bars_stay_out_of_output_no_one_watches(tmp_path):
    """transformers draws "Loading weights" and "Writing model shards" bars on stderr: in a pipe or a CI log
    each is a line of carriage returns (every model a stage loads, in `polite run` and `polite filter`)."""
    script = (
        "import sys\n"
        "import polite\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                     num_attention_heads=2, num_key_value_heads=2)\n"
        "LlamaForCausalLM(config).save_pretrained(sys.argv[1])\n"
        "LlamaForCausalLM.from_pretrained(sys.argv[1])\n"
        "print('loaded', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lm")], cwd=REPO, env=_env_without_bar_switches(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr, done.stderr
    assert "it/s" not in done.stderr, done.stderr


def test_progress_bars_stay_on_a_terminal_and_a_users_own_setting_wins(monkeypatch):
    import polite.env as env

    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(env, "interactive", lambda: True)
    env.configure_runtime_env()
    assert "TQDM_DISABLE" not in os.environ and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.setattr(env, "interactive", lambda: False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user wants them, piped or not
    env.configure_runtime_env()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0" and os.environ["TQDM_DISABLE"] == "1"


def test_open_clip_random_weights_notes_are_dropped_only_where_random_weights_are_the_point(tmp_path, caplog):
    """models/tiny.py builds the tiny base's vision tower with random weights and saves them as its weights:
    open_clip's "no CLIP weights found" and "Model initialized randomly" warnings are then no news. Elsewhere
    (a real model built without its weights) they stay."""
    import open_clip

    from models.tiny import _OPENAI_NORM, TINY_VISION
    from polite.env import random_init_on_purpose

    folder = tmp_path / "vision"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_VISION, "preprocess_cfg": _OPENAI_NORM}))
    with caplog.at_level(logging.WARNING):
        with random_init_on_purpose():
            open_clip.create_model(f"local-dir:{folder}")
            logging.getLogger().warning("another warning in the block stays")
        assert [r.getMessage() for r in caplog.records] == ["another warning in the block stays"]
        caplog.clear()
        open_clip.create_model(f"local-dir:{folder}")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "no CLIP weights found" in said and "Model initialized randomly" in said
