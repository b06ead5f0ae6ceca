"""Typed settings for the whole factory, validated before any work starts.

One module per stage holds that stage's settings; ``FactoryConfig`` composes them. A config file is YAML or
TOML; ``load_config`` turns pydantic's errors into one message per problem that says where and what to fix.
"""

from __future__ import annotations

import tomllib
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
]


class ConfigError(ValueError):
    """A config that cannot run: raised before any work, with one line per problem."""


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


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, origin: str = "(inline)") -> FactoryConfig:
    try:
        return FactoryConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


def load_config(path: str | Path | None) -> FactoryConfig:
    """Read and validate a YAML/TOML config; ``None`` gives the built-in demo config."""
    if path is None:
        return FactoryConfig()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} does not parse: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return parse_config(data, origin=str(path))
