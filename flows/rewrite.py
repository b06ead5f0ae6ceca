"""The rewrite flow: pick the work in SQL, cut it into deterministic shards, rewrite them, ingest the results.

Three ways to pick the work, all for one (model, prompt version, decoding settings) key:

* ``first`` (``polite rewrite``): the selected samples with no rewrite attempt for the key yet;
* ``retry-failed`` (``polite rewrite --retry-failed``): samples whose attempts for the key all failed;
* ``rerun: <predicate>`` (``polite rerun --where``): the samples the predicate selects in the ``lineage`` view,
  whatever their state; the new ok attempt supersedes the earlier ok one (``rewrites.superseded_by``).

Resume is a query: a killed run left its finished shards' result files behind; the next run ingests any result
file it has not ingested, and re-forms the unfinished shards identically (same samples, attempts, ids), so their
result paths match and only the shards in flight are redone. An interrupted retry or rerun resumes its own
manifest (the work it chose) instead of choosing again.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from prefect import flow

from flows.common import logger, map_shards, stage_run
from lineage.store import LineageStore
from models.prompts import PROMPT_VERSION
from polite.config import ConfigError, resolve_config
from polite.ids import settings_hash, stable_hash, stable_hashes
from polite.locks import exclusive, probe
from polite.shards import chunked, exists, read_table, write_table_atomic
from polite.workspace import Workspace
from tasks.rewrite import RESULT_SCHEMA, WORK_SCHEMA, rewrite_shard_task

RUNTIME_KEYS = ("backend", "device", "dtype", "cuda_graphs", "decode_attention", "kv_block", "shrink_batches",
                "compile_layers", "cache_new_tokens", "scheduling", "token_budget", "max_batch_size",
                "max_prompt_tokens", "prefetch_images")  # fmt: skip


# -- which model --------------------------------------------------------------------------------------------
def model_folder(store: LineageStore, ws: Workspace, ref: str | None) -> tuple[tuple | None, str]:
    """The ``models`` row (or None) and the folder of a model id, a model folder, or (None) the latest rewriter
    in the lineage; a ``ConfigError`` when there is none. Cheap (no fingerprint): the command line checks it
    before a flow starts."""
    from pathlib import Path

    row = None
    with store.reader() as con:
        if ref is None:
            row = con.execute(
                "SELECT model_id, path FROM models WHERE kind = 'rewriter' ORDER BY created_at DESC, model_id LIMIT 1"
            ).fetchone()
            if row is None:
                raise ConfigError(
                    "no rewriter in the lineage yet: train one (`polite train-rewriter`) or pass --model PATH"
                )
        else:
            row = con.execute("SELECT model_id, path FROM models WHERE model_id = ?", [ref]).fetchone()
    path = ws.locate(row[1]) if row else ref  # a trained rewriter's path is stored relative to the workspace
    if path and not Path(path).exists() and ws.local and (Path(ws.root) / path).exists():
        path = str(Path(ws.root) / path)  # --model models/rewriter-...: a folder named inside the workspace
    if not path or not Path(path).exists():
        if row is None and ref and ref.startswith("m_") and "/" not in ref:  # an id, not a folder
            raise ConfigError(
                f"rewriter {ref!r}: no model with that id in the lineage and no folder of that name; its models: "
                "polite sql \"SELECT model_id, kind, path, created_at FROM models\""
            )
        raise ConfigError(f"rewriter {ref or (row and row[0])!r}: no model folder at {path!r}")
    return row, path


def check_context_fits(cfg, model_path: str) -> None:
    """``max_prompt_tokens`` plus ``max_new_tokens`` within the rewriter's positions (``flows.preflight``), for
    this stage's own runs too (``polite rewrite``, a deployment), before any work."""
    from flows.preflight import check_context, lm_context
    from models.loader import as_spec

    context = lm_context(as_spec(model_path))
    if context is not None:
        check_context(cfg, context, model_path)


def resolve_model(store: LineageStore, ws: Workspace, ref: str | None) -> tuple[str, str, bool]:
    """``(model_id, path, registered_now)`` for a model id from the ``models`` table, a model folder, or (None)
    the latest rewriter in the lineage. ``model_id`` is always the loader's fingerprint of the files."""
    from pathlib import Path

    from models.loader import as_spec, fingerprint

    row, path = model_folder(store, ws, ref)
    spec = as_spec(path)
    model_id = fingerprint(spec)
    if row and row[0] != model_id:
        raise ConfigError(
            f"models row {row[0]} points at {path}, whose files now fingerprint as {model_id}: "
            "the folder changed after it was registered; pass --model with the folder to register it anew"
        )
    registered = False
    if not row:
        with store.writer() as con:
            known = con.execute("SELECT count(*) FROM models WHERE model_id = ?", [model_id]).fetchone()[0]
            if not known:
                params = json.dumps(spec.to_dict(), sort_keys=True, default=str)
                con.execute(
                    "INSERT INTO models (model_id, kind, base, adapter, path, params) VALUES (?, 'rewriter', ?, ?, ?, ?)",
                    [model_id, spec.lm, spec.adapter, ws.stored(Path(path).resolve()), params],
                )
                registered = True
    return model_id, str(Path(path).resolve()), registered


# -- which samples ------------------------------------------------------------------------------------------
_SELECT = """
WITH sel AS (
    SELECT s.sample_id, s.instruction, s.raw_response, coalesce(s.images, []) AS image_ids FROM samples s
    WHERE s.status = 'ok' {filters}
), done AS (
    SELECT sample_id, max(attempt) AS last_attempt, bool_or(status = 'ok') AS any_ok
    FROM rewrites WHERE model_id = $model AND prompt_version = $prompt AND settings_hash = $settings
    GROUP BY sample_id
), picked AS (
    SELECT sel.*, CAST(coalesce(done.last_attempt, 0) + 1 AS INTEGER) AS attempt
    FROM sel LEFT JOIN done USING (sample_id)
    WHERE {mode}
    ORDER BY sel.sample_id
    {limit}
), paths AS (  -- each image id's stored path, in the sample's image order ('' for an unknown id)
    SELECT u.sample_id, list(coalesce(i.path, '') ORDER BY u.k) AS image_paths
    FROM (SELECT sample_id, unnest(image_ids) AS image_id, generate_subscripts(image_ids, 1) AS k FROM picked) u
    LEFT JOIN images i USING (image_id)
    GROUP BY u.sample_id
)
SELECT picked.sample_id, picked.attempt, picked.instruction, picked.raw_response, picked.image_ids,
       coalesce(paths.image_paths, []) AS image_paths
FROM picked LEFT JOIN paths USING (sample_id)
ORDER BY {order}
"""


WORK_ORDER = "coalesce(image_ids[1], ''), sample_id"  # SQL for the order select_work sorts by


def rewrite_ids(sample_ids: list[str], attempts: list[int], key: dict[str, str]) -> list[str]:
    """``rewrite_id`` of each (sample, attempt) under one (model, prompt version, settings) key."""
    hashes = stable_hashes(
        "rewrite", sample_ids, key["model_id"], key["prompt_version"], key["settings_hash"], attempts
    )
    return ["r_" + h for h in hashes]


def _check_where(where: str | None) -> None:
    if not where or not where.strip():
        raise ConfigError(
            "rerun needs --where with a SQL predicate over the lineage view, e.g. \"source = 'gqa'\""
        )


def samples_where(store: LineageStore, where: str | None) -> pa.Table:
    """The ``sample_id`` of every sample the SQL predicate ``where`` selects in the ``lineage`` view, read-only;
    a predicate that does not parse or bind stops with ``PredicateError`` before any work."""
    _check_where(where)
    store.check_predicate(where, "lineage", "--where")
    return store.user_query(f"SELECT DISTINCT sample_id FROM lineage WHERE ({where})")


def select_work(
    store: LineageStore, rs, key: dict[str, str], mode: str, where: str | None, limit: int | None
):
    """The work rows (``WORK_SCHEMA``) for ``mode`` first / retry-failed / rerun, in shard order.

    ``limit`` keeps the first samples by ``sample_id``; the rows are then ordered by their first image, then
    ``sample_id`` (``WORK_ORDER``), so that the questions about one image (hundreds per image in GQA) share a
    shard, and its image is read, decoded and encoded once there. The order is a fixed function of the selected
    rows, so a resumed run cuts the same shards. Picking, image paths and order are one query; only the ids are
    hashed in Python (1M samples: bench/rewrite_lineage.py). Image paths are as stored (relative to the
    workspace): a manifest keeps them so, and `Workspace.locate_paths` resolves them for the workers."""
    params: dict[str, Any] = {
        "model": key["model_id"],
        "prompt": key["prompt_version"],
        "settings": key["settings_hash"],
    }
    filters = []
    rerun_ids = None
    if mode == "rerun":
        rerun_ids = samples_where(store, where)
        filters.append("AND s.sample_id IN (SELECT sample_id FROM _rerun_ids)")
        condition = "true"
    else:
        for column, values, negate in (
            ("source", rs.sources, False),
            ("task_type", rs.task_types, False),
            ("source", rs.exclude_sources, True),
            ("task_type", rs.exclude_task_types, True),
        ):
            if values:
                name = f"{'not_' if negate else ''}{column}"
                params[name] = list(values)
                filters.append(f"AND {'NOT ' if negate else ''}list_contains(${name}, s.{column})")
        condition = (
            "done.sample_id IS NULL" if mode == "first" else "done.sample_id IS NOT NULL AND NOT done.any_ok"
        )
    sql = _SELECT.format(
        filters=" ".join(filters),
        mode=condition,
        limit=f"LIMIT {int(limit)}" if limit else "",
        order=WORK_ORDER,
    )
    with store.reader() as con:
        if rerun_ids is not None:
            con.register("_rerun_ids", rerun_ids)
        picked = con.sql(sql, params=params).to_arrow_table()
    reason = {"first": "first", "retry-failed": "retry-failed"}.get(mode, f"rerun: {where}")
    n = picked.num_rows
    ids = rewrite_ids(picked.column("sample_id").to_pylist(), picked.column("attempt").to_pylist(), key)
    columns = {"rewrite_id": pa.array(ids, pa.string()), "reason": pa.array([reason] * n, pa.string())}
    return pa.table(
        [columns[f.name] if f.name in columns else picked.column(f.name).cast(f.type) for f in WORK_SCHEMA],
        schema=WORK_SCHEMA,
    )


def _pending_manifest(store: LineageStore, ws: Workspace, request_key: str) -> str | None:
    """The manifest of the latest run of this same retry/rerun request, if that run did not complete."""
    with store.reader() as con:
        row = con.execute(
            "SELECT status, config FROM runs WHERE flow = 'rewrite' "
            "AND json_extract_string(try_cast(config AS JSON), '$.request.key') = ? ORDER BY started_at DESC LIMIT 1",
            [request_key],
        ).fetchone()
    if row is None:
        return None
    status, config = row
    manifest = ws.locate((json.loads(config).get("request") or {}).get("manifest"))
    return manifest if status != "completed" and manifest and exists(manifest) else None


def pending_work(
    store: LineageStore, ws: Workspace, rs, key: dict[str, str], mode: str, where: str | None, limit: int | None
) -> tuple[pa.Table, str | None, str]:
    """``(work, manifest, request key)``: what a rewrite of ``mode`` does now, read-only. An interrupted
    retry/rerun of the same request resumes the work it chose (its ``manifest``, else None); "first" work is its
    own resume query. The same request is the same mode, predicate, key, limit and (but for a rerun) source and
    task-type filters."""
    filters = None if mode == "rerun" else [rs.sources, rs.task_types, rs.exclude_sources, rs.exclude_task_types]
    request_key = stable_hash("rewrite-request", mode, where, key, filters, limit)
    manifest = _pending_manifest(store, ws, request_key) if mode != "first" else None
    if manifest:
        return _not_done(store, read_table(manifest).cast(WORK_SCHEMA)), manifest, request_key
    return select_work(store, rs, key, mode, where, limit), None, request_key


def _not_done(store: LineageStore, work: pa.Table) -> pa.Table:
    """Work rows whose rewrite_id is not in the lineage yet."""
    with store.reader() as con:
        con.register("_work", work)
        return (
            con.sql(
                "SELECT * FROM _work WHERE rewrite_id NOT IN (SELECT rewrite_id FROM rewrites) ORDER BY "
                + WORK_ORDER
            )
            .to_arrow_table()
            .cast(WORK_SCHEMA)
        )


def cut_shards(
    work: pa.Table, shard_size: int, base: str, results_dir: str, common: dict[str, Any]
) -> list[dict]:
    """One task job per ``shard_size`` rows of ``work``, in order. A shard's work file and result path are named
    by the hash of its rewrite ids, so a resumed run cuts and names them identically and finds the results a
    killed run left. ``common``: the job fields every shard shares (model, settings, run, runtime options)."""
    jobs = []
    for rows in chunked(range(work.num_rows), shard_size):
        shard = work.slice(rows[0], len(rows))
        shard_hash = stable_hash("rewrite-shard", shard.column("rewrite_id").to_pylist(), length=20)
        work_url = f"{base}/work/{shard_hash}.parquet"
        # written again even if a killed run left it: the same rewrite ids may come with another reason (a
        # retry of what an interrupted rerun chose) or image paths
        write_table_atomic(shard, work_url)
        jobs.append({"name": f"{shard_hash[:8]} ({shard.num_rows} samples)", "work": work_url,
                     "out": f"{results_dir}/{shard_hash}.parquet", **common})  # fmt: skip
    return jobs


# -- ingesting results --------------------------------------------------------------------------------------
# ``new``: the stored rows of the file's rewrite ids, not the file's copies (another file may have stored an
# id first, with another outcome)
# The new rows as stored: a late ok copy of a row stored as failed supersedes nothing. The stored ids are
# materialized first; as a plain subquery DuckDB joined the whole table in (rerun shards 444 vs 250 ms at 1M).
_SUPERSEDE = """
UPDATE rewrites AS old SET superseded_by = new.rewrite_id
FROM (WITH stored AS MATERIALIZED (
          SELECT rewrite_id FROM rewrites WHERE status = 'ok' AND rewrite_id IN (SELECT rewrite_id FROM _new))
      SELECT * FROM _new WHERE rewrite_id IN (SELECT rewrite_id FROM stored)) AS new
WHERE old.status = 'ok' AND old.superseded_by IS NULL
  AND old.sample_id = new.sample_id AND old.model_id = new.model_id
  AND old.prompt_version = new.prompt_version AND old.settings_hash = new.settings_hash
  AND old.attempt < new.attempt
"""


def ingest_result(
    store: LineageStore, path: str, run_id: str, key: dict[str, str], recorded_as: str | None = None
) -> int:
    """Insert one result file's rows (idempotent), mark superseded rewrites, and note the file as ingested
    (``recorded_as``, its path relative to the workspace; default ``path``), in one transaction: a crash between
    the rows and the supersede would leave two accepted rewrites."""
    table = read_table(path).cast(RESULT_SCHEMA)
    with store.writer() as con:
        con.register("_new", table)
        con.execute("BEGIN TRANSACTION")
        try:
            new = store.ingest_arrow("rewrites", table, con=con)
            con.execute(_SUPERSEDE)
            con.execute(
                "INSERT OR IGNORE INTO rewrite_result_files (path, model_id, prompt_version, settings_hash, n_rows, run_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [recorded_as or path, key["model_id"], key["prompt_version"], key["settings_hash"], table.num_rows,
                 run_id],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return new


def orphan_results(store: LineageStore, ws: Workspace, results_dir: str) -> list[str]:
    """Result files in ``results_dir`` that a killed run wrote but never ingested."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(results_dir)
    if not fs.exists(root):
        return []
    listed = [f for f in fs.ls(root, detail=False) if f.endswith(".parquet") and "/.tmp-" not in f]
    # named under results_dir as the flow names them: unstrip_protocol spells some URLs otherwise (memory:///x),
    # and a file recorded under another spelling would be ingested again on every run
    files = [f"{results_dir.rstrip('/')}/{f.rsplit('/', 1)[-1]}" for f in listed]
    with store.reader() as con:
        seen = {r[0] for r in con.execute("SELECT path FROM rewrite_result_files").fetchall()}
    return sorted(f for f in files if ws.stored(f) not in seen and f not in seen)


def recover_results(store: LineageStore, ws: Workspace, results_dir: str, run_id: str, key: dict[str, str]) -> int:
    """Ingest result files of this key that a killed run wrote but never ingested. Returns how many."""
    orphans = orphan_results(store, ws, results_dir)
    for path in orphans:
        ingest_result(store, path, run_id, key, recorded_as=ws.stored(path))
    return len(orphans)


def outcome_counts(store: LineageStore, work: pa.Table) -> dict[str, int]:
    """How the selected work stands: ``ok`` and ``failed`` rewrites, and ``unattempted`` (a shard that failed whole)."""
    with store.reader() as con:
        con.register("_work", work.select(["rewrite_id"]))
        counts = dict(
            con.execute(
                "SELECT status, count(*) FROM rewrites WHERE rewrite_id IN (SELECT rewrite_id FROM _work) GROUP BY 1"
            ).fetchall()
        )
    ok, failed = int(counts.get("ok", 0)), int(counts.get("failed", 0))
    return {"ok": ok, "failed": failed, "unattempted": work.num_rows - ok - failed}


def results_folder(ws: Workspace, key: dict[str, str]) -> str:
    """Where the shards of one key write their results (a killed run's are found here again)."""
    return f"{ws.stage_dir('rewrites')}/results/{key['model_id']}/{key['prompt_version']}-{key['settings_hash']}"


def generation_settings(rs) -> dict[str, Any]:
    """The generation settings of ``rewrite`` settings: the preset with its overrides."""
    from models.generation import resolve_generation

    try:
        return resolve_generation(rs.preset, rs.overrides.model_dump(exclude_none=True))
    except ValueError as exc:
        raise ConfigError(f"rewrite settings: {exc}") from None


def rewrite_key(model_id: str, settings: dict[str, Any]) -> dict[str, str]:
    """What makes a rewrite "the same": its work, resume, results folder and lock are per key."""
    return {"model_id": model_id, "prompt_version": PROMPT_VERSION, "settings_hash": settings_hash(settings)}


def _lock_of(key: dict) -> tuple[str, str]:
    busy = f"a rewrite with model {key['model_id']}, prompt {key['prompt_version']}, settings {key['settings_hash']}"
    return f"rewrite-{stable_hash('rewrite-lock', key)}", busy


def rewrite_lock(ws: Workspace, key: dict):
    """Held by a rewrite flow while it works on ``key``: a second flow with the same key would redo the same
    shards, and its attempt numbers would race (polite/locks.py). Other keys run side by side."""
    return exclusive(ws.db_path, *_lock_of(key))


def check_rewrite_lock(ws: Workspace, key: dict) -> None:
    """Raise ``WorkspaceBusy`` now if a rewrite of ``key`` is running; take and write nothing."""
    probe(ws.db_path, *_lock_of(key))


# -- the flow -----------------------------------------------------------------------------------------------
@flow(name="rewrite")
def rewrite_flow(
    config: dict | str | None = None,
    workspace: str | None = None,
    parent_run_id: str | None = None,
    model: str | None = None,
    retry_failed: bool = False,
    where: str | None = None,
    limit: int | None = None,
) -> dict:
    """Rewrite the selected samples with the rewriter; see the module docstring for the three modes.

    ``model``: a model id or folder (default: ``rewrite.model``, else the latest rewriter in the lineage).
    Returns counts: selected, shards, ok, failed, output tokens, seconds, and the key that was used.
    """
    cfg = resolve_config(config)
    rs = cfg.rewrite
    if where is not None:  # an empty --where (an unset shell variable) must not become a plain rewrite
        _check_where(where)
    if retry_failed and where is not None:
        raise ConfigError("choose one of --retry-failed and --where: a rerun already redoes what it selects")
    if limit is not None and limit < 1:
        raise ConfigError("limit must be at least 1")
    settings = generation_settings(rs)
    if rs.backend == "fast":
        from models.generation import fast_supported

        if not fast_supported(settings):
            raise ConfigError(
                "rewrite.backend 'fast' has no repetition penalty: drop it from the settings, or use backend auto/plain"
            )
    mode = "rerun" if where is not None else "retry-failed" if retry_failed else "first"
    ws = Workspace.resolve(workspace or cfg.workspace).ensure()
    store = LineageStore(ws.db_path)
    store.migrate()
    model_id, model_path, registered = resolve_model(store, ws, model or rs.model)
    check_context_fits(cfg, model_path)
    from flows.preflight import check_source_names

    check_source_names(cfg, ws, ["rewrite"])  # a misspelt source selects nothing, and says nothing
    key = rewrite_key(model_id, settings)
    base = ws.stage_dir("rewrites")
    results_dir = results_folder(ws, key)
    log = logger()

    with rewrite_lock(ws, key):
        recovered = recover_results(store, ws, results_dir, run_id="recovered", key=key)
        work, manifest, request_key = pending_work(store, ws, rs, key, mode, where, limit)
        if manifest:
            log.info("resuming an interrupted %s: %d samples left of %s", mode, work.num_rows, manifest)
        elif mode != "first" and work.num_rows:
            manifest = f"{base}/manifests/{stable_hash('manifest', request_key, work.column('rewrite_id').to_pylist())}.parquet"
            if not exists(manifest):
                write_table_atomic(work, manifest)

        request = {"mode": mode, "where": where, "limit": limit, "key": request_key,
                   "manifest": manifest and ws.stored(manifest), **key,
                   "model_path": ws.stored(model_path), "settings": settings}  # fmt: skip
        with stage_run("rewrite", {**cfg.model_dump(mode="json"), "request": request}, ws, parent_run_id) as run:
            run.summary.update(
                mode=mode, selected=work.num_rows, recovered_files=recovered, model_registered=registered, **key
            )
            common = {"model_path": model_path, "model_id": model_id, "prompt_version": PROMPT_VERSION,
                      "settings": settings, "settings_hash": key["settings_hash"], "run_id": run.run_id,
                      **{k: getattr(rs, k) for k in RUNTIME_KEYS}}  # fmt: skip
            jobs = cut_shards(ws.locate_paths(work, "image_paths"), rs.shard_size, base, results_dir, common)
            run.summary["shards"] = len(jobs)

            def ingest(result: dict) -> None:
                ingest_result(store, result["path"], run.run_id, key, recorded_as=ws.stored(result["path"]))
                run.count("reused_shards", int(bool(result.get("reused"))))
                for name in ("output_tokens", "generate_s", "load_wait_s", "batches", "splits", "oom_splits",
                             "cache_grows", "rows_continued"):  # fmt: skip
                    if name in result:
                        run.count(name, result[name])

            log.info("rewrite (%s): %d samples in %d shards with %s", mode, work.num_rows, len(jobs), model_id)
            try:
                map_shards(rewrite_shard_task, jobs, ingest, description=f"rewrite ({mode})", stage=run)
            finally:
                # counted even when whole shards failed: the run's record says what landed and what is left
                run.summary.update(outcome_counts(store, work))
                if run.summary.get("generate_s"):
                    run.summary["tokens_per_s"] = round(
                        run.summary.get("output_tokens", 0) / run.summary["generate_s"], 1
                    )
    summary = dict(run.summary, run_id=run.run_id, workspace=ws.root)
    log.info("rewrite finished: %s", {k: summary.get(k) for k in ("selected", "ok", "failed", "shards")})
    return summary


def main(argv: list[str] | None = None) -> dict:
    """``python -m flows.rewrite``: the flow without the CLI (used by the crash-and-resume test)."""
    import argparse


    parser = argparse.ArgumentParser(prog="python -m flows.rewrite", description=rewrite_flow.__doc__)
    parser.add_argument("--workspace")
    parser.add_argument("--config", help="YAML/TOML config file")
    parser.add_argument("--model")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--where")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    cfg = resolve_config(args.config)
    from flows.runners import ray_session, stage_resources, task_runner_for

    with ray_session(cfg.runner), stage_resources(cfg.runner, "rewrite"):
        flow_ = rewrite_flow.with_options(task_runner=task_runner_for(cfg.runner, "rewrite"))
        return flow_(
            config=cfg.model_dump(mode="json", by_alias=True), workspace=args.workspace, model=args.model,
            retry_failed=args.retry_failed, where=args.where, limit=args.limit,
        )  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(main(), default=str))
