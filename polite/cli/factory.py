"""`polite run` (the whole factory; no arguments = the offline demo), `polite deploy` and `polite serve`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from polite.cli.common import (
    ConfigOpt,
    WorkspaceOpt,
    console,
    err_console,
    print_wide,
    user_errors,
    with_export_options,
)

TRY_SQL = [
    'polite sql "SELECT source, count(*) AS samples, count(*) FILTER (WHERE kept) AS kept FROM lineage GROUP BY source"',
    'polite sql "SELECT decision_reason, count(*) AS n FROM lineage WHERE kept = false GROUP BY 1 ORDER BY n DESC"',
    'polite sql "SELECT sample_id, raw_response, rewrite, semantic FROM lineage WHERE kept ORDER BY semantic LIMIT 5"',
]


def _list_index(node: list, key: str, pair: str) -> int:
    """``ingest.sources.0.limit=10``: a list item by index."""
    if not key.isdigit() or int(key) >= len(node):
        raise ValueError(f"--set {pair!r}: {key} is not an index of a {len(node)}-item list")
    return int(key)


def apply_overrides(data: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """``section.key=value`` pairs onto a config dict; values are parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    import yaml

    from polite.config import load_yaml

    for pair in pairs:
        if "=" not in pair:
            raise ValueError(
                f"--set {pair!r}: write it as section.key=value, e.g. --set rewrite.max_batch_size=8"
            )
        dotted, raw = pair.split("=", 1)
        keys = dotted.strip().split(".")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"--set {pair!r}: {raw!r} is not valid YAML ({problem})") from None

        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, key, pair)]
                continue
            child = node.setdefault(key, {})
            if not isinstance(child, dict | list):
                raise ValueError(f"--set {pair!r}: {'.'.join(keys[: depth + 1])} is a value, not a section")
            node = child
        if isinstance(node, list):
            node[_list_index(node, keys[-1], pair)] = value
        else:
            node[keys[-1]] = value
    return data


def read_config(
    path: str | None, sets: list[str], limit: int | None, runner: str | None, ray_address: str | None
):
    """The validated config: file (or demo defaults), then CLI overrides, validated once."""
    from flows.factory import demo_config
    from polite.config import ConfigError, load_config, parse_config

    if limit is not None and limit < 1:  # checked here: on the sources it would name ingest.sources.N.limit
        raise ConfigError(f"--limit must be at least 1 (rows of every source), got {limit}")
    data = (load_config(path) if path else demo_config()).model_dump(mode="json", by_alias=True)
    apply_overrides(data, sets)
    if limit is not None:
        for source in data["ingest"]["sources"]:
            source["limit"] = limit
    if runner:
        data["runner"]["kind"] = runner
    if ray_address:
        data["runner"]["ray_address"] = ray_address
    return parse_config(data, origin=path or "(demo)")


def quiet_library_warnings() -> None:
    """Before a flow runs: keep the terminal for our output (DuckDB's Arrow-copy note is not for users)."""
    import warnings

    warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")


def print_plan(p: dict[str, Any]) -> None:
    from rich.table import Table

    console.rule("[bold]plan (dry run: nothing was run)[/]")
    console.print(
        f"workspace: {p['workspace']}\nstages: {' -> '.join(p['stages'])}\nrewriter: {p['rewriter']}",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    table = Table(title="sources")
    for col in ("source", "adapter", "from", "split", "config", "rows", "rows_from", "shards"):
        table.add_column(col)
    for s in p["sources"]:
        table.add_row(
            *[
                "" if s[c] is None else f"{s[c]:,}" if isinstance(s[c], int) else str(s[c])
                for c in ("source", "adapter", "from", "split", "config", "rows", "rows_from", "shards")
            ]
        )
    print_wide(table, console)
    models = Table(title="models")
    for col in ("role", "model", "where"):
        models.add_column(col)
    for m in p["models"]:
        models.add_row(m["role"], m["model"], m["where"])
    print_wide(models, console)
    console.print(f"task runners: {p['runner']}", highlight=False, soft_wrap=True)
    for section, values in p["settings"].items():
        console.print(
            f"[bold]{section}[/]: " + json.dumps(values, default=str), highlight=False, soft_wrap=True
        )


def print_summary(result: dict[str, Any]) -> None:
    """The end of `polite run`: counts per stage, funnel, three before/after examples, where things are."""
    from rich.table import Table

    from lineage.store import LineageStore
    from tasks.report import funnel, sample_cards

    store = LineageStore(result["db"])
    with store.reader() as con:
        counts = con.execute(
            """SELECT
                (SELECT count(*) FILTER (WHERE status = 'ok') FROM samples),
                (SELECT count(*) FILTER (WHERE status <> 'ok') FROM samples),
                (SELECT count(*) FILTER (WHERE status = 'ok') FROM pairs),
                (SELECT count(*) FILTER (WHERE status <> 'ok') FROM pairs),
                (SELECT count(*) FROM models WHERE kind = 'rewriter'),
                (SELECT count(*) FILTER (WHERE status = 'ok') FROM rewrites),
                (SELECT count(*) FILTER (WHERE status <> 'ok') FROM rewrites),
                (SELECT count(*) FROM scores),
                (SELECT count(*) FILTER (WHERE kept) FROM latest_decisions),
                (SELECT count(*) FILTER (WHERE NOT kept) FROM latest_decisions),
                -- the items the latest export run published (every format holds the same items), not every
                -- export ever made here: a rerun with other settings would add its items to the old ones
                (SELECT count(DISTINCT ei.sample_id) FROM export_items ei JOIN export_runs p USING (export_id)
                 WHERE p.run_id = (SELECT run_id FROM export_runs ORDER BY published_at DESC, run_id DESC LIMIT 1))"""
        ).fetchall()[0]
    table = Table(title="counts per stage")
    for col in ("stage", "ok", "failed / dropped"):
        table.add_column(col)
    rows = [
        ("ingest: samples", counts[0], counts[1]),
        ("distort: pairs", counts[2], counts[3]),
        ("train: rewriters", counts[4], ""),
        ("rewrite: rewrites", counts[5], counts[6]),
        ("filter: scores", counts[7], ""),
        ("filter: decisions kept", counts[8], counts[9]),
        ("export: items (latest export run)", counts[10], ""),
    ]
    for name, ok, bad in rows:
        table.add_row(name, f"{ok:,}", str(bad))
    print_wide(table, console)
    steps = funnel(store, counts[10], "in the latest export run")
    ftable = Table(title="funnel")
    for col in ("step", "count", "note"):
        ftable.add_column(col)
    for s in steps:
        ftable.add_row(s["step"], f"{s['count']:,}", s["note"])
    print_wide(ftable, console)
    console.rule("[bold]before / after[/]")
    for card in sample_cards(store, 3):
        verdict = "[green]kept[/]" if card["kept"] else f"[yellow]{card['decision_reason'] or 'dropped'}[/]"
        console.print(
            f"[bold]{card['sample_id']}[/] ({card['source']}, {card['task_type']}) {verdict}", highlight=False
        )
        console.print(f"  instruction: {card['instruction']}", highlight=False)
        console.print(f"  [red]before:[/] {card['raw_response']}", highlight=False)
        console.print(f"  [green]after:[/]  {card['rewrite']}", highlight=False)
    console.rule("[bold]where things are[/]")
    export = result["stages"].get("export") or {}
    for fmt, info in (export.get("exports") or {}).items():
        console.print(f"dataset ({fmt}): {info['path']}")
    if export.get("report"):
        console.print(f"report: {export['report']}")
    console.print(f"lineage database: {result['db']}")
    console.rule("[bold]try[/]")
    for line in TRY_SQL:
        console.print(
            ("  " + line + (f" -w {result['workspace']}" if "workspace" in result else "")),
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"  polite explain <sample_id> -w {result['workspace']}", highlight=False)


def _require_api() -> None:
    """`polite deploy`/`polite serve` need the Prefect API: where it is down, say so in one line."""
    from deployments.apply import api_problem

    problem = api_problem()
    if problem:
        err_console.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command("run")
    @user_errors
    def run(
        config: ConfigOpt = None,
        workspace: WorkspaceOpt = None,
        set_: Annotated[
            list[str] | None, typer.Option("--set", help="Override a setting: section.key=value (repeat).")
        ] = None,
        model: Annotated[
            str | None, typer.Option(help="Use this rewriter (path or model_id) instead of training one (distortion still runs: "
                            "distort.enabled: false skips it).")
        ] = None,
        limit: Annotated[int | None, typer.Option(help="Ingest at most N rows of every source.")] = None,
        runner: Annotated[str | None, typer.Option(help="Task runner: threads or ray.")] = None,
        ray_address: Annotated[
            str | None, typer.Option(help="Join this Ray cluster (auto, ray://host:10001).")
        ] = None,
        formats: Annotated[list[str] | None, typer.Option("--format", help="Export format (repeat).")] = None,
        where: Annotated[
            str | None, typer.Option(help="Export selection over the lineage view (default: kept).")
        ] = None,
        push_to_hub: Annotated[
            str | None, typer.Option(help="Push the export to this Hub dataset repo.")
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Validate and print the plan; run nothing.")
        ] = False,
    ) -> None:
        """Run the whole factory; with no arguments, the offline demo on the bundled mini dataset.

        Re-running with the same config resumes: finished work is skipped.

        Examples: polite run | polite run --config configs/pf1m.yaml --dry-run | polite run --set rewrite.max_batch_size=8
        """
        quiet_library_warnings()
        cfg = read_config(config, set_ or [], limit, runner, ray_address)
        cfg = with_export_options(cfg, formats, where, push_to_hub, origin=config or "(demo)")
        from flows.factory import given_model, stages_to_run
        from flows.preflight import check_models, check_predicates, check_source_names, check_sources
        from polite.config import ConfigError
        from polite.workspace import Workspace

        ws = Workspace.resolve(workspace or cfg.workspace)
        chosen = given_model(cfg, model)
        stages = stages_to_run(cfg, chosen)
        check_predicates(cfg, ws, stages, where)
        from flows.runners import task_runner_for

        for stage in stages:  # the ray extra installed where a stage runs on Ray
            task_runner_for(cfg.runner, stage)
        if dry_run:  # the plan prints where data and weights are absent; what would stop the run here is an error
            from flows.factory import plan

            planned = plan(cfg, workspace, model)
            print_plan(planned)
            if planned["problems"]:
                raise ConfigError("the run would stop on this machine: " + "; ".join(planned["problems"]))
            return
        check_models(cfg, ws, stages, chosen)
        check_source_names(cfg, ws, stages)
        if "rewrite" in stages and "train" not in stages and ws.db_path.exists():
            # the rewriter is known now: a rewrite of the same key already running is one line before any stage
            # (where training comes first, the key is known only after it; the stage's own lock stops it then)
            from polite.cli.rewrite import _check_model_and_lock

            _check_model_and_lock(cfg, ws.root, chosen)
        if "train" in stages and ws.db_path.exists():  # a training already running: one line, before any stage
            from flows.train_rewriter import check_train_lock

            check_train_lock(ws)
        check_sources(cfg, ws, stages)  # last: it opens the local sources (and generates the demo's)
        from flows.export import ExportCheckFailed
        from flows.factory import factory_flow

        try:
            result = factory_flow(
                config=cfg.model_dump(mode="json", by_alias=True),
                workspace=workspace,
                model=model,
                formats=formats,
                where=where,
                push_to_hub=push_to_hub,
            )
        except ExportCheckFailed as exc:
            # Every stage before export finished and is recorded: show it, then say which gate held.
            print_summary({"workspace": ws.root, "db": str(ws.db_path), "stages": {}})
            err_console.print(
                f"[bold red]export not published:[/] {exc}\n"
                "Relax export.checks (e.g. --set export.checks.min_keep_rate=null) and run again: "
                "finished stages are skipped.",
                highlight=False,
            )
            raise typer.Exit(1) from None
        print_summary(result)

    @app.command("deploy")
    @user_errors
    def deploy(
        file: Annotated[
            str | None, typer.Option(help="prefect.yaml to apply. Default: deployments/prefect.yaml.")
        ] = None,
        only: Annotated[list[str] | None, typer.Option(help="Only this deployment (repeat).")] = None,
        work_pool: Annotated[
            str | None, typer.Option(help="Work pool (created as a process pool if missing).")
        ] = None,
    ) -> None:
        """Register the deployments of deployments/prefect.yaml (schedules included) with the Prefect API.

        Then start a worker: prefect worker start --pool polite-process

        Example: polite deploy --only nightly
        """
        from deployments.apply import DEFAULT_FILE, deploy_all, load_specs, runnable

        specs, skipped = runnable(load_specs(file or DEFAULT_FILE, only))
        _require_api()
        for note in skipped:
            console.print(f"[yellow]skipped[/] {note}")
        ids = deploy_all(specs, work_pool=work_pool)
        for spec, deployment_id in zip(specs, ids, strict=True):
            console.print(f"deployed {spec.name} ({spec.entrypoint}) -> {deployment_id}")
        console.print("start a worker: prefect worker start --pool " + (work_pool or "polite-process"))

    @app.command("serve")
    @user_errors
    def serve(
        file: Annotated[
            str | None, typer.Option(help="prefect.yaml to serve. Default: deployments/prefect.yaml.")
        ] = None,
        only: Annotated[list[str] | None, typer.Option(help="Only this deployment (repeat).")] = None,
        limit: Annotated[int | None, typer.Option(help="At most N concurrent flow runs.")] = None,
    ) -> None:
        """Serve the flows with their schedules from this process, no work pool needed (Ctrl-C stops).

        Trigger one: prefect deployment run export/export

        Example: polite serve --only export --only nightly
        """
        from deployments.apply import DEFAULT_FILE, load_specs, runnable, serve_all

        specs, skipped = runnable(load_specs(file or DEFAULT_FILE, only))
        _require_api()
        for note in skipped:
            console.print(f"[yellow]skipped[/] {note}")
        serve_all(specs, limit=limit)
