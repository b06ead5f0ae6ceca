"""Stage 1: make (distorted -> original) pairs from high-quality samples, and export them for rewriter training.

The flow picks the work in SQL (samples of the configured types and sources, minus pairs already made under
the same variant), writes it as work shards, runs one task per shard, and ingests each shard's pairs as it
finishes. Re-running resumes; ``retry_failed`` also redoes the failed pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from prefect import flow

from flows.common import StageRun, logger, map_shards, stage_run
from lineage.store import LineageStore
from polite.config import ConfigError, FactoryConfig, resolve_config
from polite.config.distort import METHODS, DistortSettings, MixEntry
from polite.errors import NoTrainingPairs
from polite.ids import stable_hash
from polite.shards import chunked, read_table, write_table_atomic
from polite.workspace import Workspace
from tasks.distort.record import variant_for
from tasks.distort.shard import distort_shard_task

_SELECT_COLUMNS = "s.sample_id, s.source, s.task_type, s.images, s.instruction, s.raw_response, s.meta"


def _entry_filter(entry: MixEntry, settings: DistortSettings) -> tuple[str, list[Any]]:
    """SQL over ``samples s`` for the samples a mix entry may draw from, with its parameters."""
    sql = (
        "s.status = 'ok' AND coalesce(trim(s.raw_response), '') <> '' "
        "AND list_contains(?::VARCHAR[], s.task_type)"
    )
    params: list[Any] = [entry.task_types or settings.task_types]
    if entry.sources:
        sql += " AND list_contains(?::VARCHAR[], s.source)"
        params.append(entry.sources)
    if entry.method == "retrieve":  # only images that come with captions (and boxes) can be retrieved
        # CASE, not AND: DuckDB does not promise to skip the JSON parse of a row json_valid rejects.
        sql += " AND coalesce(json_array_length(CASE WHEN json_valid(s.meta) THEN s.meta END, '$.captions'), 0) > 0"
    return sql, params


def select_work(store: LineageStore, entry: MixEntry, settings: DistortSettings, variant: str, retry_failed: bool) -> pa.Table:
    """The samples this entry still has to turn into pairs, in a stable pseudo-random order."""
    where, params = _entry_filter(entry, settings)
    made = "p.variant = ?" + (" AND p.status = 'ok'" if retry_failed else "")
    limit = ""
    if entry.count is not None:
        existing = store.query(
            f"SELECT count(*) AS n FROM pairs p JOIN samples s USING (sample_id) WHERE {made} AND {where}",
            [variant, *params],
        ).column("n")[0].as_py()
        limit = f" LIMIT {max(entry.count - existing, 0)}"
    # md5 of (sample, variant) orders samples the same way on every run, so a count picks a stable subset.
    # A retry puts the failed pairs first: new samples that sort before them would otherwise use up the count.
    failed_first = (
        "(SELECT 1 FROM pairs p WHERE p.sample_id = s.sample_id AND p.variant = ?) IS NULL, " if retry_failed else ""
    )
    return store.query(
        f"SELECT {_SELECT_COLUMNS} FROM samples s WHERE {where} "
        f"AND NOT EXISTS (SELECT 1 FROM pairs p WHERE p.sample_id = s.sample_id AND {made}) "
        f"ORDER BY {failed_first}md5(s.sample_id || ':' || ?){limit}",
        [*params, variant, *([variant] if retry_failed else []), variant],
    )


def _check_llm(settings: DistortSettings) -> None:
    llm = settings.llm
    if llm is not None and llm.backend == "local" and not llm.allow_download and not Path(llm.model).expanduser().is_dir():
        raise ConfigError(
            f"distort.llm.model: no model folder at {llm.model!r}; give a local Hugging Face causal LM folder, "
            "or set distort.llm.allow_download: true for a Hub id"
        )


def _check_llm_server(settings: DistortSettings) -> None:
    """A server that refuses every request (a wrong address, key or model) would fail every pair, each after
    its retries, and the pairs would count as made: stop before the shards with what to fix instead."""
    from tasks.distort.backends import OpenAIChatBackend

    if settings.llm is None or settings.llm.backend != "openai":
        return
    refusal = OpenAIChatBackend(settings.llm).refusal()
    if refusal:
        raise ConfigError(f"distort.llm: {refusal}; fix distort.llm (base_url, model, api_key_env) and run again")


def _record_distorter(run: StageRun, settings: DistortSettings, identity: str) -> None:
    llm = settings.llm
    assert llm is not None
    row = {
        "model_id": identity,
        "kind": "distorter",
        "base": llm.model,
        "path": llm.model if llm.backend == "local" else llm.base_url,
        "params": json.dumps(llm.model_dump(mode="json"), sort_keys=True),
        "created_by_run": run.run_id,
    }
    run.store.ingest_arrow("models", pa.Table.from_pylist([row]))


@flow(name="distort")
def distort_flow(
    config: dict | str | None = None,
    workspace: str | None = None,
    parent_run_id: str | None = None,
    retry_failed: bool = False,
    methods: list[str] | None = None,
) -> dict:
    """Make the pairs the mix asks for that are not made yet; return counts per method."""
    cfg: FactoryConfig = resolve_config(config)
    settings = cfg.distort
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if not settings.enabled:
        logger().info("distortion is disabled in the config (distort.enabled: false)")
        return {"enabled": False}
    # `--method llm` with a config whose mix has no llm entry would make nothing and look like a finished resume.
    in_mix = sorted({e.method for e in settings.mix})
    absent = sorted(set(methods or []) - set(in_mix))
    if absent:
        raise ConfigError(
            f"methods {absent} are not in distort.mix (it has {', '.join(in_mix) or 'none'}); "
            "add an entry for them, or pass the config that has one (--config)"
        )
    from flows.preflight import check_source_names

    check_source_names(cfg, Workspace.resolve(workspace or cfg.workspace), ["distort"])
    entries = [e for e in settings.mix if not methods or e.method in methods]
    run_seed = cfg.seed if settings.seed is None else settings.seed
    identity = None
    if any(e.method == "llm" for e in entries):
        from tasks.distort.backends import llm_identity

        _check_llm(settings)
        assert settings.llm is not None
        identity = llm_identity(settings.llm)
    # Variants load the template: a missing or broken one fails here, before any work.
    try:
        variants = {e.method: variant_for(e.method, settings, run_seed, identity) for e in entries}
    except ValueError as exc:
        raise ConfigError(f"distort: {exc}") from None

    with stage_run("distort", cfg.model_dump(mode="json", by_alias=True), workspace or cfg.workspace, parent_run_id) as run:
        if identity is not None:
            _record_distorter(run, settings, identity)
        jobs = _write_work_shards(run, entries, settings, variants, retry_failed)
        if any(job["method"] == "llm" for job in jobs):
            _check_llm_server(settings)

        def ingest(out: str) -> None:
            table = read_table(out)
            table = table.append_column("run_id", pa.array([run.run_id] * table.num_rows, pa.string()))
            # Replace: a retried pair (same id) supersedes its failed attempt.
            run.store.ingest_arrow("pairs", table, replace=True)
            for method, status in zip(table.column("method").to_pylist(), table.column("status").to_pylist(), strict=True):
                run.count(f"{method}_{status}")

        map_shards(distort_shard_task, jobs, ingest, "distort", stage=run, settings=settings.model_dump(mode="json"), run_seed=run_seed)
        run.summary["shards"] = len(jobs)
    return run.summary


def _write_work_shards(
    run: StageRun, entries: list[MixEntry], settings: DistortSettings, variants: dict[str, str], retry_failed: bool
) -> list[dict[str, Any]]:
    """Write each entry's selected samples as work shards; return one job per shard."""
    jobs: list[dict[str, Any]] = []
    for entry in entries:
        variant = variants[entry.method]
        work = select_work(run.store, entry, settings, variant, retry_failed)
        run.count(f"{entry.method}_selected", work.num_rows)
        logger().info(
            "distort: %d samples to turn into %s pairs (variant %s, sources %s)",
            work.num_rows, entry.method, variant, entry.sources or "all",
        )  # fmt: skip
        ids = work.column("sample_id").to_pylist()
        offset = 0
        for chunk in chunked(ids, settings.shard_size):
            # A retry must not find the output of the attempt it retries, hence the run id in its key.
            key = stable_hash("distort-shard", variant, chunk, run.run_id if retry_failed else "", length=16)
            part = work.slice(offset, len(chunk))
            offset += len(chunk)
            base = run.workspace.stage_dir("distort")
            jobs.append(
                {
                    "method": entry.method,
                    "variant": variant,
                    "key": key,
                    "work": write_table_atomic(part, f"{base}/work/{entry.method}/{variant}/{key}.parquet"),
                    "out": f"{run.workspace.stage_dir('pairs')}/{entry.method}/{variant}/{key}.parquet",
                }
            )
    return jobs


# -- the rewriter's training set ---------------------------------------------------------------------------
def write_training_set(
    config: dict | str | None = None,
    workspace: str | None = None,
    where: str | None = None,
    out: str | None = None,
    format: Literal["parquet", "datasets"] = "parquet",
    allow_empty: bool = True,
) -> str:
    """Export the ok pairs as the rewriter's training set; returns where it was written. ``allow_empty=False``:
    stop with ``NoTrainingPairs`` instead of writing a training set without a row.

    Reads the lineage read-only. ``where`` is an SQL predicate over ``pairs p`` and ``samples s`` (e.g.
    ``p.method <> 'retrieve' AND s.source = 'llava'``). Default ``out``: ``<workspace>/exports/training_set/``.
    Columns: pair_id, sample_id, method, images (paths), prompt (models.prompts.rewrite_prompt), target.
    """
    from lineage.store import check_read_only_sql
    from tasks.distort.training_set import training_rows

    if format not in ("parquet", "datasets"):
        raise ValueError(f"format must be 'parquet' or 'datasets', got {format!r}")
    cfg = resolve_config(config)
    ws = Workspace.resolve(workspace or cfg.workspace)
    store = LineageStore(ws.db_path)
    if where:  # a misspelt column stops here with the columns it may have meant, not with a DuckDB traceback
        store.check_predicate(where, "pairs p JOIN samples s USING (sample_id)", "--where")
    selected = (
        "FROM pairs p JOIN samples s USING (sample_id) WHERE p.status = 'ok' AND p.distorted IS NOT NULL "
        f"AND coalesce(trim(p.original), '') <> '' AND ({where or 'true'})"
    )
    sql = (
        "SELECT p.pair_id, p.sample_id, p.method, s.images AS image_ids, p.instruction, p.distorted, p.original "
        f"{selected} ORDER BY p.pair_id"
    )
    check_read_only_sql(sql)  # a predicate cannot smuggle in a second statement
    pairs = store.user_query(sql).to_pylist()
    images = store.user_query(
        f"SELECT image_id, path FROM images WHERE image_id IN (SELECT unnest(s.images) {selected})"
    ).to_pylist()
    table, unresolved = training_rows(pairs, {r["image_id"]: ws.locate(r["path"]) for r in images})
    if unresolved:
        logger().warning("%d pairs left out: their images are not in the images table (e.g. %s)", len(unresolved), unresolved[0])
    if not allow_empty and table.num_rows == 0:
        raise NoTrainingPairs(f"no ok pairs{' match --where' if where else ''}: nothing written (run "
                              "`polite distort` first, or loosen --where)")  # fmt: skip
    if out is None:
        tag = stable_hash("training-set", where or "", length=10)
        out = ws.url("exports", "training_set", f"pairs-{tag}" + (".parquet" if format == "parquet" else ""))
    if format == "parquet":
        return write_table_atomic(table, out)
    import datasets

    datasets.Dataset(table).save_to_disk(out)
    return out
