"""Settings that cannot run are refused when the config is read, naming the key: before any stage works."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from polite.cli import app
from polite.config import ConfigError, load_config, parse_config


def _refused(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_generation_settings_that_do_not_resolve_are_refused_at_parse():
    """min_new_tokens above max_new_tokens was found by the rewrite stage, after ingest, distortion and
    training had run. The preset's own max_new_tokens counts (beam: 1024)."""
    message = _refused({"rewrite": {"overrides": {"max_new_tokens": 16, "min_new_tokens": 500}}})
    assert "rewrite.overrides: Value error, min_new_tokens cannot exceed max_new_tokens (preset 'greedy'" in message
    assert "rewrite.overrides" in _refused({"rewrite": {"preset": "beam", "overrides": {"min_new_tokens": 2000}}})
    parse_config({"rewrite": {"overrides": {"max_new_tokens": 16, "min_new_tokens": 16}}})
    # a wrong preset is named once, as itself
    message = _refused({"rewrite": {"preset": "nope", "overrides": {"min_new_tokens": 5000}}})
    assert "rewrite.preset" in message and "rewrite.overrides" not in message
    result = CliRunner().invoke(
        app, ["run", "--set", "rewrite.overrides={max_new_tokens: 16, min_new_tokens: 500}", "--dry-run"]
    )
    assert result.exit_code == 2 and "rewrite.overrides: Value error" in result.output, result.output


def test_a_misspelt_task_type_to_rewrite_or_exclude_is_refused_with_the_one_it_meant():
    """`task_types: [vqa_typo]` rewrote nothing; `exclude_task_types: [detailed_captions, conversations]`
    rewrote the training targets as if they were raw annotations."""
    message = _refused({"rewrite": {"task_types": ["vqa", "captoin"]}})
    assert "rewrite.task_types: Value error, unknown task type 'captoin' (did you mean 'caption'?); known: " in message
    message = _refused({"rewrite": {"exclude_task_types": ["detailed_captions", "conversations"]}})
    assert (
        "rewrite.exclude_task_types: Value error, unknown task types 'detailed_captions' (did you mean "
        "'detailed_caption'?), 'conversations' (did you mean 'conversation'?)"
    ) in message
    message = _refused({"distort": {"mix": [{"method": "augment", "task_types": ["convo"]}]}})
    assert "distort.mix.0: Value error, task_types: unknown task type 'convo'" in message
    parse_config({"rewrite": {"task_types": ["vqa", "caption"], "exclude_task_types": []}})


def test_a_key_given_twice_in_a_config_file_is_refused_naming_it_and_both_lines(tmp_path):
    """YAML keeps the last of two equal keys: a second `rewrite:` block silently dropped the first one."""
    path = tmp_path / "config.yaml"
    path.write_text("rewrite:\n  preset: greedy\n  overrides: {max_new_tokens: 8}\nseed: 1\nrewrite:\n  preset: beam\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"config file {path}: key 'rewrite' appears twice (lines 1 and 5): the second would replace the first; "
        "merge them into one"
    )
    path.write_text("rewrite:\n  overrides:\n    max_new_tokens: 8\n    max_new_tokens: 9\n")
    with pytest.raises(ConfigError, match="key 'max_new_tokens' appears twice \\(lines 3 and 4\\)"):
        load_config(path)
    # a merge key's override is on purpose
    path.write_text("rewrite:\n  <<: {preset: beam, shard_size: 8}\n  shard_size: 16\n")
    assert load_config(path).rewrite.shard_size == 16
    result = CliRunner().invoke(app, ["run", "--set", "rewrite.overrides={seed: 1, seed: 2}", "--dry-run"])
    assert result.exit_code == 2 and "key 'seed' appears twice" in result.output, result.output


@pytest.mark.parametrize("threshold", [500, -100.5, 100.01])
def test_a_clipscore_threshold_out_of_range_is_refused(threshold):
    """CLIPScore is 100 x cosine: a threshold outside [-100, 100] keeps every paragraph or none."""
    message = _refused({"filters": {"clipscore": {"threshold": threshold}}})
    assert "filters.clipscore.threshold: Input should be" in message


def test_a_clipscore_threshold_in_range_is_kept():
    for threshold in (-100, -40, 0, 17.5, 100):
        assert parse_config({"filters": {"clipscore": {"threshold": threshold}}}).filters.clipscore.threshold == threshold


def test_run_limit_below_one_names_the_option():
    """It named the key it is copied into, `ingest.sources.0.limit`."""
    result = CliRunner().invoke(app, ["run", "--limit", "0", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "--limit must be at least 1" in result.output and "ingest.sources" not in result.output
