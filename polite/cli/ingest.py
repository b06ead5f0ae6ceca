"""CLI commands of the ingest stage: `polite ingest SOURCE [--from ...]` and `polite ingest --list`."""

from __future__ import annotations

from typing import Annotated

import typer

from polite.cli.common import ConfigOpt, WorkspaceOpt, console, stage_config, user_errors

EXAMPLES = """
Examples:

  polite ingest --list

  polite ingest demo

  polite ingest vqav2 --from lmms-lab/VQAv2 --split validation --limit 10000

  polite ingest gqa --from ./GQA --config-name testdev_balanced_instructions

  polite ingest coco_captions --from ./COCO-Caption2017 -o boxes_from=./coco-det

  polite ingest llava_instruct --from ./LLaVA-Instruct -o image_folder=./train2017

  polite ingest generic --from data.parquet --mapping mapping.yaml --name my_vqa

  polite ingest generic --from data.parquet --mapping mapping.yaml --name my_vqa --retry-failed

  polite ingest --config configs/pf1m.yaml
"""


def _options(pairs: list[str]) -> dict:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value) if value else ""
    return options


# What people call a mapping key, and the key they mean: a spelling match alone suggests 'options' for 'question'.
MAPPING_SYNONYMS = {
    "question": "instruction", "prompt": "instruction", "query": "instruction",
    "answer": "response", "caption": "response", "target": "response", "output": "response",
    "id": "key", "choices": "options", "img": "image", "image_path": "image",
}


def _mapping(path: str) -> dict:
    """The ``--mapping`` file, validated here so that its errors name the file (not the command line's config)."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from polite.config import ConfigError, DuplicateKeyError, load_yaml
    from polite.config.ingest import ColumnMapping

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"--mapping {path}: no such file")
    try:
        data = load_yaml(file.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(f"--mapping {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--mapping {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--mapping {path} must hold a mapping (task_type, response, ...)")
    try:
        ColumnMapping.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_mapping_errors(exc, path)) from None
    return data


def _mapping_errors(exc, path: str) -> str:
    import difflib

    from polite.config.ingest import ColumnMapping

    keys = list(ColumnMapping.model_fields)
    lines = [f"invalid --mapping {path}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            name = str(err["loc"][-1])
            close = MAPPING_SYNONYMS.get(name.lower()) or next(iter(difflib.get_close_matches(name, keys, 1, 0.5)), None)
            message = "unknown key" + (f"; did you mean {close!r}?" if close else "") + f" (keys: {', '.join(keys)})"
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def list_adapters() -> None:
    from rich.table import Table

    from tasks.sources import ADAPTERS

    table = Table(title="ingest adapters (polite ingest NAME --from HUB_ID_OR_FOLDER)")
    for column in ("name", "default --from", "default split", "what becomes a sample"):
        table.add_column(column)
    for name, cls in ADAPTERS.items():
        split = cls.default_split or ""
        if cls.default_config:
            split = f"{split} (config {cls.default_config})"
        table.add_row(name, cls.hub_id or ("generated" if name == "demo" else "--from required"), split, cls.summary)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to `app`."""

    @app.command("ingest", epilog=EXAMPLES)
    @user_errors
    def ingest(
        source: Annotated[str | None, typer.Argument(help="Adapter name (see --list). Omit to ingest the config's sources.")] = None,
        from_: Annotated[str | None, typer.Option("--from", help="Hub id, local folder of the dataset's files, a parquet/json/csv file, or save_to_disk output.")] = None,
        split: Annotated[str | None, typer.Option("--split", help="Split to read (default: the adapter's).")] = None,
        limit: Annotated[int | None, typer.Option("--limit", min=1, help="Read only the first N rows.")] = None,
        config_name: Annotated[str | None, typer.Option("--config-name", help="Hub dataset config (e.g. GQA's testdev_balanced_instructions).")] = None,
        revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")] = None,
        name: Annotated[str | None, typer.Option("--name", help="Label in the lineage's `source` column (default: the adapter name).")] = None,
        mapping: Annotated[str | None, typer.Option("--mapping", help="YAML column mapping for the generic adapter (see docs/ingest.md).")] = None,
        option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Adapter option KEY=VALUE (repeatable), e.g. image_folder=DIR, boxes_from=DIR.")] = None,
        shard_size: Annotated[int | None, typer.Option("--shard-size", min=1, help="Rows per shard (default from config: 2000).")] = None,
        retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Read the shards that hold failed samples again (after fixing image files); failed samples that now map replace their failed records.")] = False,
        list_: Annotated[bool, typer.Option("--list", help="List the adapters and exit.")] = False,
        workspace: WorkspaceOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """Ingest a source dataset into the workspace: samples and images, with lineage in DuckDB.

        Bad rows (missing/broken images, empty annotations) become failed samples and the run goes on;
        running the same command again adds nothing.
        """
        if list_:
            list_adapters()
            return
        cfg = stage_config(config)
        data = cfg.model_dump(mode="json", by_alias=True)
        if shard_size:
            data["ingest"]["shard_size"] = shard_size
        sources, checked = None, cfg
        if source is not None:
            spec = {"adapter": source, "from": from_, "split": split, "limit": limit, "config_name": config_name,
                    "revision": revision, "name": name, "options": _options(option or [])}
            if mapping:
                spec["mapping"] = _mapping(mapping)
            sources = [spec]
            # validated here, not only in the flow: a bad source is one line, not a flow run's traceback
            from polite.config import parse_config

            checked = parse_config({**data, "ingest": {**data["ingest"], "sources": sources}}, origin="(command line)")
        elif any(v is not None for v in (from_, split, limit, config_name, revision, name, mapping)) or option:
            raise ValueError("--from/--split/--limit/... need a SOURCE (an adapter name; see --list)")
        from prefect.task_runners import ThreadPoolTaskRunner

        from flows.ingest import ingest_flow
        from tasks.sources import get_adapter

        for spec in checked.ingest.sources:  # adapter options too, before a flow run starts
            get_adapter(spec)
        runner = ThreadPoolTaskRunner(max_workers=cfg.runner.max_workers)
        summary = ingest_flow.with_options(task_runner=runner)(
            config=data, workspace=workspace, sources=sources, retry_failed=retry_failed
        )
        if summary.get("failed"):
            console.print(
                f"{summary['failed']} failed sample(s): polite sql \"SELECT source, error, count(*) FROM samples "
                "WHERE status = 'failed' GROUP BY ALL\""
            )
