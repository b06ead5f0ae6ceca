"""CLI commands of the rewrite stage: `polite rewrite [--retry-failed]` and `polite rerun --where SQL`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from polite.cli.common import ConfigOpt, WorkspaceOpt, check_predicate, console, stage_config, user_errors

REWRITE_EXAMPLES = """
Examples:
  polite rewrite                        # every selected sample not yet rewritten with this model/settings
  polite rewrite --model workspace/models/rewriter-0123abcd   # a model folder (in the lineage) or a model_id
  polite rewrite --preset paper         # the released decoding: 3 beams, sampling, no-repeat 3-grams
  polite rewrite --set rewrite.overrides.max_new_tokens=256 --set rewrite.token_budget=32768
  polite rewrite --retry-failed         # only samples whose attempts all failed
  polite rewrite --dry-run              # how many samples, by source and task, with which model and settings
"""
RERUN_EXAMPLES = """
Examples:
  polite rerun --where "source = 'gqa' AND reward < -2"
  polite rerun --where "rewrite_status = 'ok' AND length(rewrite) < 20" --preset beam
  polite rerun --where "sample_id = 's_0123456789abcdef'"
  polite rerun --where "source = 'gqa'" --dry-run   # what it would redo, without doing it
"""

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Rewriter: a model folder or a model_id (default: latest rewriter in the lineage).",
    ),
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", help="Decoding preset: greedy (default), beam or paper.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Config override section.key=value (repeatable), e.g. rewrite.shard_size=256."
    ),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="Rewrite at most N samples (first by sample_id).")
]
DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", help="Print what would be rewritten (samples by source and task, shards, model, "
                 "settings) and stop: nothing is written and no flow starts."),
]  # fmt: skip


def _config(path: str | None, preset: str | None, sets: list[str] | None) -> dict[str, Any]:
    from polite.cli.factory import apply_overrides
    from polite.config import parse_config

    data = stage_config(path).model_dump(mode="json", by_alias=True, exclude_unset=True)
    apply_overrides(data, list(sets or []))
    if preset:
        data.setdefault("rewrite", {})["preset"] = preset
    return parse_config(data, origin=path or "(demo)").model_dump(mode="json", by_alias=True)


def _run(config: dict[str, Any], workspace: str | None, **kwargs: Any) -> dict[str, Any]:
    from flows.rewrite import rewrite_flow
    from flows.runners import ray_session, stage_resources, task_runner_for
    from polite.config import parse_config

    cfg = parse_config(config)
    _check_model_and_lock(cfg, workspace or cfg.workspace, kwargs.get("model") or cfg.rewrite.model)
    runner = cfg.runner
    with ray_session(runner), stage_resources(runner, "rewrite"):
        flow = rewrite_flow.with_options(task_runner=task_runner_for(runner, "rewrite"))
        return flow(config=config, workspace=workspace, **kwargs)


def _key(cfg, workspace: str, model: str | None) -> tuple[dict[str, str], str]:
    """The key (model, prompt, settings) and model folder the flow would use; a missing rewriter is one line.
    A registered model's id is its row's (the flow stops when the files no longer fingerprint as that), an
    unregistered folder's the fingerprint it would be registered under (cached for the flow)."""
    from flows.rewrite import generation_settings, model_folder, rewrite_key
    from lineage.store import LineageStore
    from models.loader import as_spec, fingerprint
    from polite.workspace import Workspace

    ws = Workspace.resolve(workspace)
    row, path = model_folder(LineageStore(ws.db_path), ws, model)
    return rewrite_key(row[0] if row else fingerprint(as_spec(path)), generation_settings(cfg.rewrite)), path


def _check_model_and_lock(cfg, workspace: str, model: str | None) -> None:
    """A missing rewriter, or a rewrite of the same key (model, prompt, settings) already running in the workspace,
    is one line before the flow (and a Prefect server) starts, not a flow run's traceback.

    The lock is only probed (taken and dropped at once, naming no holder): the flow takes it for itself, and a
    rewrite that starts between the two is still stopped by the flow's own lock (polite/locks.py).
    """
    from flows.preflight import check_source_names
    from flows.rewrite import check_context_fits, check_rewrite_lock
    from polite.workspace import Workspace

    key, path = _key(cfg, workspace, model)
    check_context_fits(cfg, path)
    check_source_names(cfg, Workspace.resolve(workspace), ["rewrite"])
    check_rewrite_lock(Workspace.resolve(workspace), key)


def _dry_run(config: dict[str, Any], workspace: str | None, model: str | None, mode: str, where: str | None,
             limit: int | None) -> None:  # fmt: skip
    """What the command would rewrite now, read from the lineage without writing anything or starting a flow.

    The flow first ingests the result files a killed run left; their samples are taken out here as it would
    (any attempt for a first rewrite, an ok one for a retry; a rerun redoes its selection regardless)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from flows.preflight import check_source_names
    from flows.rewrite import check_rewrite_lock, orphan_results, pending_work, results_folder
    from lineage.store import LineageStore
    from polite.config import parse_config
    from polite.locks import WorkspaceBusy
    from polite.shards import read_table
    from polite.workspace import Workspace

    cfg = parse_config(config)
    ws = Workspace.resolve(workspace or cfg.workspace)
    rs = cfg.rewrite
    check_source_names(cfg, ws, ["rewrite"])  # a typo stops the real command: the dry run says so too
    key, path = _key(cfg, ws.root, model or rs.model)
    store = LineageStore(ws.db_path)
    try:
        check_rewrite_lock(ws, key)
        running = None
    except WorkspaceBusy as exc:
        running = str(exc)
    work, manifest, _ = pending_work(store, ws, rs, key, mode, where, limit)
    orphans = orphan_results(store, ws, results_folder(ws, key))
    if orphans and mode != "rerun":
        left = [read_table(f, columns=["sample_id", "status"]) for f in orphans]
        done = {r["sample_id"] for t in left for r in t.to_pylist() if mode == "first" or r["status"] == "ok"}
        work = work.filter(pc.invert(pc.is_in(work.column("sample_id"), value_set=pa.array(sorted(done), pa.string()))))
    with store.reader() as con:
        con.register("_work", work.select(["sample_id"]))
        groups = con.execute(
            "SELECT source, task_type, count(*) FROM samples WHERE sample_id IN (SELECT sample_id FROM _work) "
            "GROUP BY ALL ORDER BY 3 DESC, 1, 2"
        ).fetchall()
    shards = -(-work.num_rows // rs.shard_size)
    console.print(
        f"dry run, rewrite ({mode}): {work.num_rows} samples in {shards} shards of up to {rs.shard_size}, with "
        f"model {key['model_id']} ({path}), prompt {key['prompt_version']}, settings {key['settings_hash']} "
        f"(preset {rs.preset})",
        highlight=False,
    )
    for source, task_type, n in groups:
        console.print(f"  {source} / {task_type}: {n}", highlight=False)
    if running:
        console.print(f"now: {running}; the command would stop at once", highlight=False)
    elif manifest:
        console.print(f"resumes an interrupted {mode} of the same request ({ws.stored(manifest)})", highlight=False)
    if orphans:
        console.print(
            f"{len(orphans)} result files a killed run left are ingested first (their samples are not counted above)",
            highlight=False,
        )


def _run_and_report(config: dict[str, Any], workspace: str | None, **kwargs: Any) -> None:
    """Run the flow and print its summary; where whole shards failed, print what landed before the error."""
    from flows.common import ShardFailures

    try:
        summary = _run(config, workspace, **kwargs)
    except ShardFailures as exc:
        if exc.summary:
            _report(exc.summary)
        raise
    _report(summary)


def _report(summary: dict[str, Any]) -> None:
    left = f", {summary['unattempted']} not attempted" if summary.get("unattempted") else ""
    console.print(
        f"rewrite ({summary['mode']}): {summary['selected']} selected, {summary.get('ok', 0)} ok, "
        f"{summary.get('failed', 0)} failed{left} in {summary.get('shards', 0)} shards "
        f"(model {summary['model_id']}, settings {summary['settings_hash']})",
        highlight=False,
    )
    if summary.get("tokens_per_s"):
        console.print(
            f"{summary.get('output_tokens', 0)} tokens generated, {summary['tokens_per_s']} tokens/s"
        )
    # how the batches fitted the memory: what `rewrite.cache_new_tokens` and `token_budget` are tuned by
    fitting = [f"{summary[k]} {label}" for k, label in (("batches", "batches"), ("cache_grows", "cache grows"),
               ("rows_continued", "rows continued after the ring"), ("oom_splits", "out-of-memory splits"))
               if summary.get(k)]  # fmt: skip
    if fitting:
        console.print(", ".join(fitting), highlight=False)
    if summary.get("failed"):
        if summary.get("mode") == "rerun":
            # --retry-failed takes samples with no ok rewrite; these keep the rewrite the rerun was to replace
            failed = f"SELECT sample_id FROM rewrites WHERE run_id = '{summary.get('run_id')}' AND status = 'failed'"
            retry = ("the failed samples keep their earlier rewrite; retry them with "
                     f"`polite rerun --where \"sample_id IN ({failed})\"`")  # fmt: skip
        else:
            retry = "retry them with `polite rewrite --retry-failed`"
        console.print(
            "failures: polite sql \"SELECT error, count(*) FROM rewrites WHERE status = 'failed' GROUP BY 1\"; "
            + retry,
            highlight=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Add this stage's commands to `app`."""

    @app.command("rewrite", epilog=REWRITE_EXAMPLES)
    @user_errors
    def rewrite(
        workspace: WorkspaceOpt = None,
        config: ConfigOpt = None,
        model: ModelOpt = None,
        retry_failed: Annotated[
            bool, typer.Option("--retry-failed", help="Redo only samples whose attempts all failed.")
        ] = False,
        preset: PresetOpt = None,
        set_: SetOpt = None,
        limit: LimitOpt = None,
        dry_run: DryRunOpt = False,
    ) -> None:
        """Rewrite raw annotations with the rewriter, batched on the GPU; resumes where it stopped.

        Every sample gets one result per attempt (ok or failed, with the reason); run it again after a crash
        and only unfinished shards are redone.
        """
        data = _config(config, preset, set_)
        if dry_run:
            return _dry_run(data, workspace, model, "retry-failed" if retry_failed else "first", None, limit)
        _run_and_report(data, workspace, model=model, retry_failed=retry_failed, limit=limit)

    @app.command("rerun", epilog=RERUN_EXAMPLES)
    @user_errors
    def rerun(
        where: Annotated[
            str, typer.Option("--where", help="SQL predicate over the `lineage` view (one row per sample).")
        ],
        workspace: WorkspaceOpt = None,
        config: ConfigOpt = None,
        model: ModelOpt = None,
        preset: PresetOpt = None,
        set_: SetOpt = None,
        limit: LimitOpt = None,
        dry_run: DryRunOpt = False,
    ) -> None:
        """Redo the rewrites of exactly the samples a SQL predicate selects, recording why (`rerun: <predicate>`).

        The new ok rewrite supersedes the earlier one of the same model and settings; nothing else is touched.
        """
        data = _config(config, preset, set_)
        check_predicate(workspace, data["workspace"], where, "lineage", "--where")
        if dry_run:
            return _dry_run(data, workspace, model, "rerun", where, limit)
        _run_and_report(data, workspace, model=model, where=where, limit=limit)
