"""Typed settings for the whole factory, validated before any work starts.

One module per stage holds that stage's settings; ``FactoryConfig`` composes them. A config file is YAML or
TOML; ``load_config`` turns pydantic's errors into one message per problem that says where and what to fix.
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polite.config.distort import DistortSettings
from polite.config.export import ExportSettings
from polite.config.filters import FilterSettings
from polite.config.ingest import ColumnMapping, IngestSettings, SourceSpec
from polite.config.rewrite import RewriteSettings
from polite.config.runner import RunnerSettings
from polite.config.train import TrainSettings
from polite.errors import UserError

__all__ = [
    "ColumnMapping",
    "ConfigError",
    "DistortSettings",
    "ExportSettings",
    "FactoryConfig",
    "FilterSettings",
    "IngestSettings",
    "RewriteSettings",
    "RunnerSettings",
    "SourceSpec",
    "TrainSettings",
    "load_config",
    "load_yaml",
]


class ConfigError(UserError, ValueError):
    """A config that cannot run: raised before any work, with one line per problem."""


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem  # what yaml's own errors carry, and what `--set` prints


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` keeps the last of two equal keys: a second ``rewrite:`` block would silently replace
    the first one, overrides and exclusions included. This loader refuses the second key, naming both lines."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key: an override, on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise DuplicateKeyError(
                            f"key {key!r} appears twice (lines {first[key]} and {line}): the second would replace "
                            "the first; merge them into one"
                        )
                    first[key] = line
                except TypeError:  # an unhashable key: the constructor below says so
                    break
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (``DuplicateKeyError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only


class FactoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workspace: str | None = None
    seed: int = 0
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    distort: DistortSettings = Field(default_factory=DistortSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    rewrite: RewriteSettings = Field(default_factory=RewriteSettings)
    filters: FilterSettings = Field(default_factory=FilterSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)


def _settings_class(annotation: Any) -> type[BaseModel] | None:
    """The settings model inside a field's annotation (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _settings_class(arg)
        if found is not None:
            return found
    return None


def known_keys(loc: tuple) -> list[str]:
    """The keys the settings model at ``loc`` (a pydantic error location, ending in the offending key) takes."""
    model: type[BaseModel] | None = FactoryConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue  # a list index: the same model as the list's items
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        model = _settings_class(fields[part].annotation) if part in fields else None
    return sorted(f.alias or name for name, f in model.model_fields.items()) if model is not None else []


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            keys = known_keys(tuple(err["loc"]))
            close = difflib.get_close_matches(str(err["loc"][-1]), keys, n=1, cutoff=0.5)
            message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
            if keys:
                message += f" (known here: {', '.join(keys)})"
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, origin: str = "(inline)") -> FactoryConfig:
    try:
        return FactoryConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


# The offline demo (`polite run` with no config; configs/demo.yaml writes it out). It differs from the built-in
# defaults in two settings: a fixed number of training steps (not a wall-clock budget, so the demo's outcome is
# the same on a fast or a busy machine), and rewrites capped at 224 new tokens, room for a full scene
# description (the default is the paper's 1024: the tiny rewriter does not always learn to stop).
DEMO: dict[str, Any] = {
    "train": {"max_steps": 300, "time_budget_s": None},
    "rewrite": {"overrides": {"max_new_tokens": 224}},
}


def demo_config() -> FactoryConfig:
    return parse_config(DEMO, origin="(demo)")


def resolve_config(config: dict | str | Path | None) -> FactoryConfig:
    """What every flow and command takes: a config dict, a YAML/TOML path (what a deployment passes), or
    ``None`` for the demo's (so a stage run after the demo works on the demo's samples, settings and keys)."""
    if config is None:
        return demo_config()
    if isinstance(config, str | Path):
        return load_config(config)
    return parse_config(config)


def load_config(path: str | Path | None) -> FactoryConfig:
    """Read and validate a YAML/TOML config; ``None`` gives the built-in defaults (``resolve_config``: the demo's)."""
    if path is None:
        return FactoryConfig()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"config file {path}: {exc.problem}") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} does not parse: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping at the top level, got {type(data).__name__}"
        )
    return parse_config(data, origin=str(path))
