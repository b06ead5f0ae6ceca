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
import importlib.util
import math
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import logger, stage_run
from flows.preflight import (
    check_models,
    check_predicates,
    check_run,
    check_source_names,
    opens_here,
    source_adapter,
    source_errors,
)
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
    ws = Workspace.resolve(workspace or cfg.workspace)
    chosen = given_model(cfg, model)
    order = stages_to_run(cfg, chosen)
    flows = {s: stage_flow(s) for s in order}  # every stage importable before any work
    runners = {s: task_runner_for(cfg.runner, s) for s in order}  # and its runner installed
    if ws.db_path.exists():  # the views as this code defines them, before binding the predicates
        LineageStore(ws.db_path).migrate()
    # a run refused here (a deployment's first night without a rewriter) leaves no workspace behind: the
    # checks read an empty schema elsewhere where there is no lineage yet (flows/preflight.py)
    check_predicates(cfg, ws, order, where)
    check_run(cfg, ws, order, chosen)
    ws.ensure()
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

    if opens_here(spec):
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
        with source_errors(index, spec):
            adapter = source_adapter(spec, ws)
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


def _where(ref: str, allow_download: bool = False, cached: bool | None = None) -> str:
    """How a model reference would be found: a local path (present or not), or a Hub id, in the local cache or
    not, and if not, whether it can be downloaded (``allow_download``, and the hub not offline)."""
    from filters.models import available_locally
    from polite.env import hub_offline

    if ref.startswith(("/", "./", "../", "~", "local-dir:", "package:")) or Path(ref).expanduser().exists():
        path = Path(ref.split(":", 1)[1] if ref.startswith("local-dir:") else ref).expanduser()
        if ref.startswith("package:"):
            return "bundled Python package"
        return "present" if path.exists() else "ABSENT on this machine"
    if cached if cached is not None else available_locally(ref):
        return "Hub id, in the local cache"
    if not allow_download:
        return "Hub id, NOT in the local cache (downloads are off)"
    if hub_offline():
        return "Hub id, NOT in the local cache, and HF_HUB_OFFLINE is set: cannot be downloaded"
    return "Hub id, downloaded on first use"


def _rewriter_where(ref: str) -> str:
    """A rewriter is a folder or the id of a model in the lineage, never a Hub id."""
    if ref.startswith("m_") and "/" not in ref and not Path(ref).exists():
        return "a model id of the lineage"
    return "present" if Path(ref).expanduser().exists() else "ABSENT on this machine"


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
        out.append({"role": "rewriter", "model": chosen, "where": _rewriter_where(chosen)})
    if "filter" in stages:
        from filters.chain import can_download
        from flows.preflight import hub_models

        download = cfg.filters.allow_download  # what the config allows: `where` says if HF_HUB_OFFLINE forbids it
        hub = {m["key"]: m for m in hub_models(cfg, stages)}
        for name in ("semantic", "nli", "clipscore", "reward"):
            scorer = getattr(cfg.filters, name, None)
            if scorer is None or scorer.enabled is False:
                continue
            model = scorer.model
            if name == "clipscore":  # an open_clip architecture; its weights are what may be missing
                model = f"{scorer.model}/{scorer.pretrained}" if scorer.pretrained else scorer.model
                listed = hub.get("filters.clipscore.pretrained")
                where = _clip_where(scorer, download) if listed is None else _where(model, True, listed["cached"])
            else:
                listed = hub.get(f"filters.{name}.model")
                where = _where(scorer.model, download, listed["cached"] if listed else None)
            here = where.startswith(("present", "bundled", "Hub id, in the local cache"))
            fallback = getattr(scorer, "fallback_model", None)
            if can_download(cfg.filters) and not here:
                pass  # downloads allowed: neither a fallback nor `auto` steps in (the chain takes it as available)
            elif fallback and not here:
                where += f"; else {fallback}"
            elif scorer.enabled == "auto" and not here:
                where += "; auto: skipped when not available"
            out.append({"role": f"filter {name}", "model": model, "where": where})
    return out


def _clip_where(scorer, allow_download: bool) -> str:
    """CLIPScore's weights: a local file, or an open_clip tag (a Hub file) in the cache or not."""
    from filters.models import is_local_path

    pretrained = scorer.pretrained
    if not pretrained or pretrained == "none":
        return "no weights (random: set filters.clipscore.pretrained)"
    if is_local_path(pretrained):
        return _where(pretrained)
    if importlib.util.find_spec("open_clip") is None:
        return "open_clip is not installed (pip install open-clip-torch)"
    from filters.clipscore import clip_weights_cached

    return _where(f"{scorer.model}/{pretrained}", allow_download, clip_weights_cached(scorer.model, pretrained))
