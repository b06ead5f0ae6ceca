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
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import logger, stage_run
from flows.runners import ray_session, stage_resources, task_runner_for
from lineage.store import LineageStore
from polite.config import DEMO, ConfigError, FactoryConfig, demo_config, resolve_config  # noqa: F401 (re-exported)
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
    import tempfile

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


def check_models(cfg: FactoryConfig, ws: Workspace, stages: list[str], chosen: str | None) -> None:
    """Find the rewriter the run needs, the base training starts from and the filters' scorers before any
    stage works.

    Each stage looks for its models only when it starts: a ``--model`` naming no folder, or a config that trains
    nothing in a workspace with no rewriter yet (the nightly run's first night), would cost every stage before
    the rewrite, and a scorer enabled without its model every stage before the filter. Raises ``ConfigError``,
    ``ScorerUnavailableError`` or ``FileNotFoundError``."""
    if "train" in stages:  # what the train stage checks first
        if not ws.local:
            raise ConfigError(
                f"training reads and writes models on local disk; {ws.root} is not a local workspace"
            )
        if cfg.train.base != "tiny":
            from models.loader import as_spec

            as_spec(cfg.train.base)
    if "rewrite" in stages and "train" not in stages:  # trained in this run: found when training ends
        from flows.rewrite import model_folder

        with _checking_store(ws) as store:
            model_folder(store, ws, chosen)
    if "filter" in stages:  # what the filter stage checks first
        from filters.chain import build_chain

        chain = build_chain(cfg.filters)  # a scorer enabled without its model: ScorerUnavailableError, a UserError
        if not chain.scorers:
            raise ConfigError(
                "every scorer is disabled: enable at least one under `filters:` (e.g. filters.length.enabled: true)"
            )


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
    check_models(cfg, ws, order, chosen)
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


def _source_rows(spec, adapter) -> tuple[int | None, str]:
    """Rows of one source: from local data when it is here, else the known split size."""
    if spec.adapter == "demo":  # generated at ingest; a dry run writes nothing
        from tasks.sources.demo import DEFAULT_SCENES

        rows = int(spec.options.get("scenes", DEFAULT_SCENES))
        return (min(rows, spec.limit) if spec.limit else rows), "bundled demo scenes"
    origin = adapter.source
    if spec.from_ and Path(spec.from_).expanduser().exists():
        try:
            rows = adapter.load().num_rows
            return (min(rows, spec.limit) if spec.limit else rows), "counted"
        except Exception as exc:  # the plan must print even when a source cannot open
            return None, f"cannot open: {exc}"
    known = KNOWN_ROWS.get((origin, adapter.config_name, adapter.split))
    if known is None:
        return spec.limit, "limit (split size unknown)" if spec.limit else "unknown split size"
    return (min(known, spec.limit) if spec.limit else known), "estimated (dataset card)"


def plan(cfg: FactoryConfig, workspace: str | None = None, model: str | None = None) -> dict[str, Any]:
    """What a run would do, without doing it: sources and shard counts, models, settings, runner."""
    from tasks.sources import get_adapter

    ws = Workspace.resolve(workspace or cfg.workspace)
    sources = []
    for spec in cfg.ingest.sources:
        adapter = get_adapter(spec, ws.root)
        rows, how = _source_rows(spec, adapter)
        sources.append(
            {
                "source": spec.label,
                "adapter": spec.adapter,
                "from": adapter.source if spec.adapter != "demo" else "(bundled)",
                "split": adapter.split,
                "config": adapter.config_name,
                "rows": rows,
                "rows_from": how,
                "shards": math.ceil(rows / cfg.ingest.shard_size) if rows else None,
            }
        )
    chosen = given_model(cfg, model)
    stages = stages_to_run(cfg, chosen)
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
