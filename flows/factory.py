"""The whole factory as one flow: ingest -> distort -> train rewriter -> rewrite -> filter -> export.

Every stage is a subflow with ``parent_run_id`` set to the factory's run, and every stage resumes by query,
so running the factory again with the same config skips finished work: ingest adds no sample twice, distort
and rewrite pick only samples without an ok result for the same settings, training reuses a model trained
on the same pairs and settings, filter scores only unscored rewrites, and export lands in the same folder.

The task runner of each stage comes from ``runner`` settings (flows/runners.py): the factory applies it with
``stage_flow.with_options(task_runner=...)``, and Ray GPU annotations with ``stage_resources``.
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import logger, stage_run
from flows.runners import ray_session, stage_resources, task_runner_for
from lineage.store import LineageStore
from polite.config import DEMO, ConfigError, FactoryConfig, demo_config, resolve_config  # noqa: F401 (re-exported)
from polite.config.names import unknown_names
from polite.errors import UserError
from polite.workspace import Workspace

STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("flows.ingest", "ingest_flow"),
    "distort": ("flows.distort", "distort_flow"),
    "train": ("flows.train_rewriter", "train_rewriter_flow"),
    "rewrite": ("flows.rewrite", "rewrite_flow"),
    "filter": ("flows.filter", "filter_flow"),
    "export": ("flows.export", "export_flow"),
}


def given_model(cfg: FactoryConfig, model: str | None) -> str | None:
    """A rewriter to use instead of training one: the ``model`` argument, else ``rewrite.model`` when set."""
    return model or cfg.rewrite.model or None


def stage_flow(stage: str):
    module, name = STAGES[stage]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"stage {stage!r} is not available ({module}.{name}): {exc}") from exc


def _enabled(cfg: FactoryConfig, stage: str) -> bool:
    section = {"filter": "filters"}.get(stage, stage)
    return bool(getattr(getattr(cfg, section), "enabled", True))


def _compact(result: Any) -> Any:
    """Stage summaries for the factory's own summary: scalars and short lists only."""
    if not isinstance(result, dict):
        return result
    return {
        k: v
        for k, v in result.items()
        if isinstance(v, str | int | float | bool | type(None)) or k == "exports"
    }


def stages_to_run(cfg: FactoryConfig, chosen: str | None) -> list[str]:
    """The enabled stages in order; training only when no rewriter is given."""
    return [s for s in STAGES if _enabled(cfg, s) and not (s == "train" and chosen)]


@contextmanager
def _checking_store(ws: Workspace) -> Iterator[LineageStore]:
    """The workspace's lineage to check against; where there is none yet, an empty one of the same schema in a
    temporary folder, so a dry run (and a refused run) still writes nothing."""
    if ws.db_path.exists():
        yield LineageStore(ws.db_path)
        return
    with tempfile.TemporaryDirectory(prefix="polite-schema-") as scratch:
        store = LineageStore(Path(scratch) / "lineage.duckdb")
        store.migrate()
        yield store


def check_predicates(cfg: FactoryConfig, ws: Workspace, stages: list[str], where: str | None = None) -> None:
    """Bind the run's SQL predicates (the export selection, the training pairs) before any stage works.

    The export stage checks its own only when it starts, after every stage before it: a misspelt column found
    there costs the whole run. A workspace without a lineage yet binds against an empty one of the same
    schema in a temporary folder, so a dry run still writes nothing. Raises ``PredicateError``."""
    checks = []
    selection = where if where is not None else cfg.export.where
    if "export" in stages and selection:
        checks.append((selection, "lineage", "export.where (--where)"))
    if "train" in stages and cfg.train.pairs_where:
        from flows.train_rewriter import PAIRS_SOURCE

        checks.append((cfg.train.pairs_where, PAIRS_SOURCE, "train.pairs_where"))
    if not checks:
        return
    with _checking_store(ws) as store:
        for predicate, source, option in checks:
            store.check_predicate(predicate, source, option)


@contextmanager
def _noted(problems: list[str] | None) -> Iterator[None]:
    """Raise a check's error (a run), or, given ``problems`` (the dry run), note it there and go on to the next."""
    if problems is None:
        yield
        return
    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        problems.append(str(exc))


def _spec(ref: str, key: str):
    """The model spec (flamingo.json) of a model folder, or a ``ConfigError`` naming the setting that gave it."""
    from models.loader import as_spec

    try:
        return as_spec(ref)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _lm_context(spec) -> int | None:
    """The language model's positions, read from its config (no weights); None where it cannot be read here."""
    config = spec.lm_config
    if config is None and spec.lm and (Path(spec.lm) / "config.json").is_file():
        config = json.loads((Path(spec.lm) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance((config or {}).get(key), int):
            return config[key]
    return None


def _check_training(cfg: FactoryConfig, ws: Workspace) -> tuple[int | None, str]:
    """What the train stage checks first, and the paths it reads later; returns the base's context."""
    if not ws.local:
        raise ConfigError(f"training reads and writes models on local disk; {ws.root} is not a local workspace")
    adapter = cfg.train.init_adapter
    if adapter and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        # found by the training step otherwise, after ingest and distortion, as a peft traceback
        raise ConfigError(
            f"train.init_adapter: no LoRA adapter folder at {adapter} (a peft adapter folder holds "
            "adapter_config.json); fix the path or leave train.init_adapter out for a fresh adapter"
        )
    if cfg.train.base == "tiny":
        from models.tiny import TINY_LM

        return TINY_LM["max_position_embeddings"], "the tiny base trained in this run"
    return _lm_context(_spec(cfg.train.base, "train.base")), f"train.base {cfg.train.base}"


def _check_rewriter(cfg: FactoryConfig, ws: Workspace, chosen: str | None) -> tuple[int | None, str]:
    """The rewriter the rewrite stage would load (given, or the latest in the lineage); returns its context."""
    from flows.rewrite import model_folder

    key = "rewrite.model" if chosen is None or chosen == cfg.rewrite.model else "--model"
    with _checking_store(ws) as store:
        try:
            _, path = model_folder(store, ws, chosen)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return _lm_context(_spec(path, key)), f"{key} {chosen}" if chosen else f"the latest rewriter, {path}"


def check_context(cfg: FactoryConfig, context: int, model: str) -> None:
    """A prompt of ``max_prompt_tokens`` plus ``max_new_tokens`` must fit the rewriter's positions: past them a
    model of rotary positions (the tiny one, LLaMA) still decodes, into garbage stored as an ok rewrite."""
    from flows.rewrite import generation_settings

    new = generation_settings(cfg.rewrite)["max_new_tokens"]
    prompt = cfg.rewrite.max_prompt_tokens
    if prompt + new > context:
        raise ConfigError(
            f"rewrite.max_prompt_tokens {prompt} + max_new_tokens {new} = {prompt + new} exceed the rewriter's "
            f"context of {context} positions ({model}): set rewrite.max_prompt_tokens to at most {context - new} "
            "(or lower rewrite.overrides.max_new_tokens)"
        )


def _chain_can_fail(cfg: FactoryConfig) -> bool:
    """Building the filter chain fails only on a model scorer enabled explicitly (its model may be absent) or on
    no scorer left. It decides an `auto` CLIPScore by importing open_clip (3 s), so where neither can happen
    (the demo's filters) the check is skipped, and a dry run stays quick."""
    scorers = [s for s in vars(cfg.filters).values() if hasattr(s, "enabled")]
    explicit_model = any(s.enabled is True and hasattr(s, "model") for s in scorers)
    text_scorer_on = any(s.enabled is not False and not hasattr(s, "model") for s in scorers)
    return explicit_model or not text_scorer_on


def check_models(
    cfg: FactoryConfig, ws: Workspace, stages: list[str], chosen: str | None, problems: list[str] | None = None
) -> None:
    """Find the rewriter the run needs, the base (and adapter) training starts from and the filters' scorers
    before any stage works, and check that the rewrite's prompt and new tokens fit the rewriter's context.

    Each stage looks for its models only when it starts: a ``--model`` naming no folder, or a config that trains
    nothing in a workspace with no rewriter yet (the nightly run's first night), would cost every stage before
    the rewrite, and a scorer enabled without its model every stage before the filter. Raises ``ConfigError``
    (naming the setting) or ``ScorerUnavailableError``; with ``problems``, notes each there instead."""
    context, model = None, ""
    if "train" in stages:
        with _noted(problems):
            context, model = _check_training(cfg, ws)
    if "rewrite" in stages and "train" not in stages:  # trained in this run: found when training ends
        with _noted(problems):
            context, model = _check_rewriter(cfg, ws, chosen)
    if "rewrite" in stages and context is not None:
        with _noted(problems):
            check_context(cfg, context, model)
    if "filter" in stages and _chain_can_fail(cfg):  # what the filter stage checks first
        from filters.chain import build_chain

        with _noted(problems):
            chain = build_chain(cfg.filters)  # a scorer enabled without its model: ScorerUnavailableError
            if not chain.scorers:
                raise ConfigError(
                    "every scorer is disabled: enable at least one under `filters:` (e.g. filters.length.enabled: true)"
                )


def check_source_names(
    cfg: FactoryConfig, ws: Workspace, stages: list[str], problems: list[str] | None = None
) -> None:
    """The sources ``rewrite.sources`` and ``distort.mix[].sources`` select must be the config's own or already in
    the lineage: a misspelt one selects no sample, and the run ends without a word about it."""
    lists = []
    if "rewrite" in stages and cfg.rewrite.sources:
        lists.append(("rewrite.sources", cfg.rewrite.sources))
    if "distort" in stages:
        lists += [(f"distort.mix.{i}.sources", e.sources) for i, e in enumerate(cfg.distort.mix) if e.sources]
    if not lists:
        return
    known = {spec.label for spec in cfg.ingest.sources}
    if ws.db_path.exists():
        with LineageStore(ws.db_path).reader() as con:
            known |= {row[0] for row in con.execute("SELECT DISTINCT source FROM samples").fetchall()}
    for key, names in lists:
        problem = unknown_names(names, known, "source")
        if problem:
            with _noted(problems):
                raise ConfigError(f"{key}: {problem} (the config's ingest sources and those in the lineage)")


@contextmanager
def _source_errors(index: int, spec) -> Iterator[None]:
    """A source's error, naming its place in the config."""
    try:
        yield
    except UserError as exc:
        raise ConfigError(f"ingest.sources.{index} ({spec.label}): {exc}") from None


def _opens_here(spec) -> bool:
    """Sources opened before the run starts: the demo (generated here) and local data. A Hub dataset is left to
    the ingest stage: opening it is downloading it, which a run does as a recorded stage."""
    from tasks.sources.loading import looks_local

    return (spec.adapter == "demo" and not spec.from_) or bool(spec.from_ and looks_local(spec.from_))


def _source_adapter(spec, ws: Workspace):
    """A source's adapter, checked where no data is read: its options, its local `from`, somewhere to read."""
    from tasks.sources import get_adapter
    from tasks.sources.loading import looks_local

    adapter = get_adapter(spec, ws.root)  # checks the adapter's options
    if spec.from_ and looks_local(spec.from_) and not Path(spec.from_).expanduser().exists():
        raise ConfigError(f"from {spec.from_}: no such file or folder")
    if not _opens_here(spec):
        _ = adapter.source  # a Hub id or `from` (the demo's generates it)
    return adapter


def check_sources(cfg: FactoryConfig, ws: Workspace, stages: list[str]) -> None:
    """Open the run's local sources (the demo: generate it) and check their columns and options, as the ingest
    stage does first (``tasks.ingest.plan_source``), before a run is recorded: a misspelt column, a missing
    ``from`` or a bad option otherwise ends a recorded factory run. The opened datasets stay cached for the
    ingest stage (per process, and the `datasets` cache under the workspace)."""
    if "ingest" not in stages:
        return
    from tasks.ingest import plan_source

    labels = [spec.label for spec in cfg.ingest.sources]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"ingest.sources: two sources share a label {labels}: give each a distinct `name`")
    for i, spec in enumerate(cfg.ingest.sources):  # what needs no data first: a bad later source writes nothing
        with _source_errors(i, spec):
            _source_adapter(spec, ws)
    for i, spec in enumerate(cfg.ingest.sources):
        if _opens_here(spec):
            with _source_errors(i, spec):
                plan_source(spec, ws.root, cfg.ingest.shard_size)


def check_run(cfg: FactoryConfig, ws: Workspace, stages: list[str], chosen: str | None) -> None:
    """Every check a run makes before it is recorded, cheapest first (the sources are opened last)."""
    check_models(cfg, ws, stages, chosen)
    check_source_names(cfg, ws, stages)
    check_sources(cfg, ws, stages)


@flow(name="factory")
def factory_flow(
    config: dict | str | None = None,
    workspace: str | None = None,
    parent_run_id: str | None = None,
    model: str | None = None,
    formats: list[str] | None = None,
    where: str | None = None,
    push_to_hub: str | None = None,
) -> dict:
    """Run every enabled stage in order; with a given ``model`` (path or id) skip training.

    ``formats``/``where``/``push_to_hub`` are passed to the export stage. Returns each stage's summary.
    """
    cfg = resolve_config(config)
    ws = Workspace.resolve(workspace or cfg.workspace).ensure()
    chosen = given_model(cfg, model)
    order = stages_to_run(cfg, chosen)
    flows = {s: stage_flow(s) for s in order}  # every stage importable before any work
    runners = {s: task_runner_for(cfg.runner, s) for s in order}  # and its runner installed
    LineageStore(ws.db_path).migrate()  # the views as this code defines them, before binding the predicates
    check_predicates(cfg, ws, order, where)
    check_run(cfg, ws, order, chosen)
    data = cfg.model_dump(mode="json", by_alias=True)
    log = logger()
    stages: dict[str, Any] = {}
    with stage_run("factory", data, ws, parent_run_id, starts_workspace=True) as run, ray_session(cfg.runner):
        for stage in order:
            runner = runners[stage]
            sub = flows[stage].with_options(task_runner=runner)
            kwargs: dict[str, Any] = {}
            if stage == "rewrite":
                kwargs["model"] = chosen
            if stage == "export":
                kwargs.update(formats=formats, where=where, push_to_hub=push_to_hub)
            log.info("factory: %s (%s runner)", stage, type(runner).__name__)
            with stage_resources(cfg.runner, stage):
                result = sub(config=data, workspace=ws.root, parent_run_id=run.run_id, **kwargs)
            stages[stage] = result
            run.summary[stage] = _compact(result)  # as each stage ends, so a failed run shows how far it got
            if stage == "train" and isinstance(result, dict):
                chosen = result.get("path") or result.get("model_id")
            run.summary["model"] = chosen
    return {
        "run_id": run.run_id,
        "workspace": ws.root,
        "db": str(ws.db_path),
        "model": chosen,
        "stages": stages,
    }


# -- the plan printed by `polite run --dry-run` -----------------------------------------------------------

# Rows of splits we know (dataset cards), to estimate shard counts when the data is not on this machine.
KNOWN_ROWS: dict[tuple[str, str | None, str | None], int] = {
    ("lmms-lab/VQAv2", None, "validation"): 214_354,
    ("lmms-lab/VQAv2", None, "testdev"): 107_394,
    ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"): 12_578,
    ("lmms-lab/GQA", "train_balanced_instructions", "train"): 943_000,
    ("lmms-lab/GQA", "val_balanced_instructions", "val"): 132_062,
    ("HuggingFaceM4/A-OKVQA", None, "train"): 17_056,
    ("HuggingFaceM4/A-OKVQA", None, "validation"): 1_145,
    ("lmms-lab/OK-VQA", None, "val2014"): 5_046,
    ("lmms-lab/textvqa", None, "train"): 34_602,
    ("lmms-lab/textvqa", None, "validation"): 5_000,
    ("derek-thomas/ScienceQA", None, "train"): 12_726,
    ("derek-thomas/ScienceQA", None, "validation"): 4_241,
    ("lmms-lab/COCO-Caption2017", None, "val"): 5_000,
    ("lmms-lab/flickr30k", None, "test"): 31_783,
}


def _source_rows(spec, adapter, scratch: str, shard_size: int) -> tuple[int | None, str]:
    """Rows of one source: planned as the ingest stage plans it where the data is here (the demo generated in
    ``scratch``, local data opened there: a dry run writes nothing), else the known split size. Raises a
    ``UserError`` where the real run would stop (a missing ``from``, a missing column, a bad option)."""
    from tasks.ingest import plan_source

    if _opens_here(spec):
        rows = plan_source(spec, scratch, shard_size).rows
        return rows, "bundled demo scenes" if spec.adapter == "demo" else "counted"
    known = KNOWN_ROWS.get((adapter.source, adapter.config_name, adapter.split))
    if known is None:
        return spec.limit, "limit (split size unknown)" if spec.limit else "unknown split size"
    return (min(known, spec.limit) if spec.limit else known), "estimated (dataset card)"


def _planned_source(index: int, spec, ws: Workspace, scratch: str, shard_size: int, problems: list[str]) -> dict:
    """One row of the plan's sources table; what would stop the real run goes to ``problems``."""
    from tasks.sources.loading import looks_local

    adapter, rows, how = None, None, ""
    origin = "(bundled)" if spec.adapter == "demo" and not spec.from_ else spec.from_
    try:
        with _source_errors(index, spec):
            adapter = _source_adapter(spec, ws)
            origin = origin or adapter.source
            rows, how = _source_rows(spec, adapter, scratch, shard_size)
    except ConfigError as exc:
        problems.append(str(exc))
        absent = spec.from_ and looks_local(spec.from_) and not Path(spec.from_).expanduser().exists()
        how = "ABSENT on this machine" if absent else "cannot open"
    return {
        "source": spec.label,
        "adapter": spec.adapter,
        "from": origin,
        "split": adapter.split if adapter else spec.split,
        "config": adapter.config_name if adapter else spec.config_name,
        "rows": rows,
        "rows_from": how,
        "shards": math.ceil(rows / shard_size) if rows else None,
    }


def plan(cfg: FactoryConfig, workspace: str | None = None, model: str | None = None) -> dict[str, Any]:
    """What a run would do, without doing it: sources and shard counts, models, settings, runner, and
    ``problems``: what would stop the real run on this machine (each names its setting)."""
    ws = Workspace.resolve(workspace or cfg.workspace)
    chosen = given_model(cfg, model)
    stages = stages_to_run(cfg, chosen)
    problems: list[str] = []
    labels = [spec.label for spec in cfg.ingest.sources]
    if "ingest" in stages and len(set(labels)) != len(labels):
        problems.append(f"ingest.sources: two sources share a label {labels}: give each a distinct `name`")
    with tempfile.TemporaryDirectory(prefix="polite-plan-") as scratch:
        sources = [
            _planned_source(i, spec, ws, scratch, cfg.ingest.shard_size, problems if "ingest" in stages else [])
            for i, spec in enumerate(cfg.ingest.sources)
        ]
    check_source_names(cfg, ws, stages, problems)
    check_models(cfg, ws, stages, chosen, problems)
    settings = {
        section: getattr(cfg, section).model_dump(mode="json")
        for section in ("distort", "train", "rewrite", "filters", "export", "runner")
    }
    return {
        "workspace": ws.root,
        "stages": stages,
        "sources": sources,
        "rewriter": chosen
        or (
            "trained in this run (train settings)"
            if "train" in stages
            else "the latest rewriter in the lineage"
        ),
        "models": _models(cfg, stages, chosen),
        "settings": settings,
        "runner": {s: type(task_runner_for(cfg.runner, s)).__name__ for s in stages},
        "problems": problems,
    }


def _where(ref: str, allow_download: bool = False) -> str:
    """How a model reference would be found: a local path (present or not) or a Hub id."""
    if ref.startswith(("/", "./", "../", "~", "local-dir:", "package:")) or Path(ref).expanduser().exists():
        path = Path(ref.split(":", 1)[1] if ref.startswith("local-dir:") else ref).expanduser()
        if ref.startswith("package:"):
            return "bundled Python package"
        return "present" if path.exists() else "ABSENT on this machine"
    return (
        "Hub id, downloaded on first use"
        if allow_download
        else "Hub id (local cache only: downloads are off)"
    )


def _models(cfg: FactoryConfig, stages: list[str], chosen: str | None) -> list[dict[str, str]]:
    """Every model the run would load, and whether it is here."""
    out = []
    if "distort" in stages and cfg.distort.llm is not None:
        llm = cfg.distort.llm
        where = llm.base_url if llm.backend == "openai" else _where(llm.model, llm.allow_download)
        out.append({"role": f"distorter ({llm.backend})", "model": llm.model, "where": where})
    if "train" in stages:
        base = cfg.train.base
        out.append(
            {
                "role": "rewriter base (trained here)",
                "model": base,
                "where": "made in the workspace" if base == "tiny" else _where(base),
            }
        )
    if chosen:
        out.append({"role": "rewriter", "model": chosen, "where": _where(chosen)})
    if "filter" in stages:
        for name in ("semantic", "nli", "clipscore", "reward"):
            scorer = getattr(cfg.filters, name, None)
            if scorer is None or scorer.enabled is False:
                continue
            where = _where(scorer.model, cfg.filters.allow_download)
            fallback = getattr(scorer, "fallback_model", None)
            if fallback and not where.startswith("present"):
                where += f"; else {fallback}"
            elif scorer.enabled == "auto" and not where.startswith("present"):
                where += "; auto: skipped when not available"
            out.append({"role": f"filter {name}", "model": scorer.model, "where": where})
    return out
