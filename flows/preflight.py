"""What the factory checks before it records a run: settings that name things (models, adapters, sources,
SQL predicates) are resolved, the sources are opened, and the prompt fits the model's context. A refused run
writes nothing; the dry run (``flows.factory.plan``) collects the same problems instead of stopping at the
first.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lineage.store import LineageStore
from polite.config import ConfigError, FactoryConfig
from polite.config.names import unknown_names
from polite.errors import UserError
from polite.workspace import Workspace


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


def lm_context(spec) -> int | None:
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
    return lm_context(_spec(cfg.train.base, "train.base")), f"train.base {cfg.train.base}"


def _check_rewriter(cfg: FactoryConfig, ws: Workspace, chosen: str | None) -> tuple[int | None, str]:
    """The rewriter the rewrite stage would load (given, or the latest in the lineage); returns its context."""
    from flows.rewrite import model_folder

    key = "rewrite.model" if chosen is None or chosen == cfg.rewrite.model else "--model"
    with _checking_store(ws) as store:
        try:
            _, path = model_folder(store, ws, chosen)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return lm_context(_spec(path, key)), f"{key} {chosen}" if chosen else f"the latest rewriter, {path}"


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
    before any stage works, and check that the rewrite's prompt and new tokens fit the rewriter's context, and
    that no Hub model the run would download is missing while the hub is offline (``check_hub_offline``).

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
    offline = check_hub_offline(cfg, stages, problems)
    if "filter" in stages and _chain_can_fail(cfg):  # what the filter stage checks first
        from filters.chain import build_chain

        settings = cfg.filters
        # a scorer named above (missing offline) is left out here: the chain stops on the first scorer it cannot
        # load, so it would name that one again and hide the problems of the others
        reported = {m["key"].split(".")[1] for m in offline if m["stage"] == "filter"}
        if reported:
            settings = settings.model_copy(
                update={name: getattr(settings, name).model_copy(update={"enabled": False}) for name in reported}
            )
        with _noted(problems):
            chain = build_chain(settings)  # a scorer enabled without its model: ScorerUnavailableError
            if not chain.scorers and not reported:
                raise ConfigError(
                    "every scorer is disabled: enable at least one under `filters:` (e.g. filters.length.enabled: true)"
                )


def hub_models(cfg: FactoryConfig, stages: list[str]) -> list[dict]:
    """Every model the run would load by Hub id with downloads allowed by its config (``filters.allow_download``,
    ``distort.llm.allow_download``): ``key`` (the setting), ``ref`` (as the plan shows it), ``stage``,
    ``allowed_by``, ``cached`` (found in the local Hugging Face cache), and for a scorer ``auto`` (``enabled:
    auto``) and ``fallback`` (the model used instead when downloads are off). Local folders and files are not here:
    the other checks look for them. Hub ids without downloads allowed are not either: those load from the
    cache or are skipped (``auto``) or refused (``enabled: true``) by the filter chain's own check."""
    from filters.models import available_locally, is_local_path

    found = []
    llm = cfg.distort.llm
    uses_llm = any(entry.method == "llm" for entry in cfg.distort.mix)
    if "distort" in stages and uses_llm and llm is not None and llm.backend == "local" and llm.allow_download:
        if not Path(llm.model).expanduser().is_dir():
            found.append({"key": "distort.llm.model", "ref": llm.model, "stage": "distort",
                          "allowed_by": "distort.llm.allow_download", "cached": available_locally(llm.model)})  # fmt: skip
    if "filter" not in stages or not cfg.filters.enabled or not cfg.filters.allow_download:
        return found
    for name in ("semantic", "nli", "reward", "clipscore"):
        scorer = getattr(cfg.filters, name)
        if scorer.enabled is False:
            continue
        if name == "clipscore":
            if not scorer.pretrained or scorer.pretrained == "none" or is_local_path(scorer.pretrained):
                continue
            if importlib.util.find_spec("open_clip") is None:  # the chain's own check says what to install
                continue
            from filters.clipscore import clip_weights_cached

            key, ref = "filters.clipscore.pretrained", f"{scorer.model}/{scorer.pretrained}"
            cached = clip_weights_cached(scorer.model, scorer.pretrained)
        else:
            if scorer.model.startswith("package:") or is_local_path(scorer.model):
                continue
            key, ref, cached = f"filters.{name}.model", scorer.model, available_locally(scorer.model)
        found.append({"key": key, "ref": ref, "stage": "filter", "allowed_by": "filters.allow_download",
                      "cached": cached, "auto": scorer.enabled == "auto",
                      "fallback": getattr(scorer, "fallback_model", None)})  # fmt: skip
    return found


def check_hub_offline(cfg: FactoryConfig, stages: list[str], problems: list[str] | None = None) -> list[dict]:
    """With ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, a Hub model missing from the local cache cannot
    be downloaded, whatever ``allow_download`` says, and the stage that loads it would fail. Say so before any
    stage works, naming the setting. An ``auto`` scorer is no problem: offline the filter chain does what it does
    when downloads are off (``filters.chain.can_download``), skipping it with a warning or, for the semantic
    scorer, using its fallback model, and the plan says which. An explicitly enabled one is, a semantic model with
    a fallback too: the fallback scores differently from the model the thresholds were set for. Raises
    ``ConfigError``; with ``problems``, notes each there instead. Returns the models it reported."""
    from polite.env import hub_offline

    if not hub_offline():
        return []
    reported = []
    for model in hub_models(cfg, stages):
        if model["cached"] or model.get("auto"):
            continue
        reported.append(model)
        skip = f"; or set {model['allowed_by']}: false to use {model['fallback']} instead" if model.get("fallback") else ""
        with _noted(problems):
            raise ConfigError(
                f"{model['key']}: {model['ref']} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, "
                f"so the {model['stage']} stage cannot download it and would fail; unset HF_HUB_OFFLINE, or point "
                f"{model['key']} at a local copy{skip}"
            )
    return reported


def check_source_names(
    cfg: FactoryConfig, ws: Workspace, stages: list[str], problems: list[str] | None = None
) -> None:
    """The sources ``rewrite.sources``, ``rewrite.exclude_sources`` and ``distort.mix[].sources`` name must be the
    config's own or already in the lineage: a misspelt one selects no sample, or excludes none (and the training
    targets it was meant to keep get rewritten), and the run ends without a word about it."""
    lists = []
    if "rewrite" in stages and cfg.rewrite.sources:
        lists.append(("rewrite.sources", cfg.rewrite.sources))
    if "rewrite" in stages and cfg.rewrite.exclude_sources:
        lists.append(("rewrite.exclude_sources", cfg.rewrite.exclude_sources))
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
def source_errors(index: int, spec) -> Iterator[None]:
    """A source's error, naming its place in the config."""
    try:
        yield
    except UserError as exc:
        raise ConfigError(f"ingest.sources.{index} ({spec.label}): {exc}") from None


def opens_here(spec) -> bool:
    """Sources opened before the run starts: the demo (generated here) and local data. A Hub dataset is left to
    the ingest stage: opening it is downloading it, which a run does as a recorded stage."""
    from tasks.sources.loading import looks_local

    return (spec.adapter == "demo" and not spec.from_) or bool(spec.from_ and looks_local(spec.from_))


def source_adapter(spec, ws: Workspace):
    """A source's adapter, checked where no data is read: its options, its local `from`, somewhere to read."""
    from tasks.sources import get_adapter
    from tasks.sources.loading import looks_local

    adapter = get_adapter(spec, ws.root)  # checks the adapter's options
    if spec.from_ and looks_local(spec.from_) and not Path(spec.from_).expanduser().exists():
        raise ConfigError(f"from {spec.from_}: no such file or folder")
    if not opens_here(spec):
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
        with source_errors(i, spec):
            source_adapter(spec, ws)
    for i, spec in enumerate(cfg.ingest.sources):
        if opens_here(spec):
            with source_errors(i, spec):
                plan_source(spec, ws.root, cfg.ingest.shard_size)


def check_run(cfg: FactoryConfig, ws: Workspace, stages: list[str], chosen: str | None) -> None:
    """Every check a run makes before it is recorded, cheapest first (the sources are opened last)."""
    check_models(cfg, ws, stages, chosen)
    check_source_names(cfg, ws, stages)
    check_sources(cfg, ws, stages)
