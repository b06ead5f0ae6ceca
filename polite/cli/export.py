"""`polite export`: publish the kept rewrites (gated by SQL checks) and write the report."""

from __future__ import annotations

from typing import Annotated

import typer

from polite.cli.common import (
    ConfigOpt,
    WorkspaceOpt,
    check_predicate,
    console,
    stage_config,
    user_errors,
    with_export_options,
)
from polite.config.export import Dedupe


def register(app: typer.Typer) -> None:
    @app.command("export")
    @user_errors
    def export(
        config: ConfigOpt = None,
        workspace: WorkspaceOpt = None,
        formats: Annotated[
            list[str] | None, typer.Option("--format", help="datasets, parquet, pf1m or llava (repeat).")
        ] = None,
        where: Annotated[
            str | None, typer.Option(help="Selection over the lineage view; replaces the default `kept`.")
        ] = None,
        push_to_hub: Annotated[
            str | None, typer.Option(help="Push to this Hub dataset repo (user/name).")
        ] = None,
        dedupe: Annotated[
            Dedupe | None,
            typer.Option(help="Drop duplicate items, keeping the first by sample_id: exact (same images, "
                         "instruction and response) or response (same response). Default: export.dedupe."),
        ] = None,
    ) -> None:
        """Export kept rewrites of latest rewrites, after the publishing checks pass.

        Examples: polite export --format pf1m --format llava |
        polite export --where "kept AND source = 'gqa'" | polite export --push-to-hub me/polite-demo |
        polite export --dedupe response
        """
        from polite.cli.factory import quiet_library_warnings

        quiet_library_warnings()  # before Prefect is imported: it reads its settings once
        from flows.export import export_flow

        cfg = with_export_options(
            stage_config(config), formats, where, push_to_hub, origin=config or "(demo)"
        )
        if dedupe is not None:  # typer has checked the value against the setting's Literal
            cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"dedupe": dedupe})})
        check_predicate(workspace, cfg.workspace, where, "lineage", "--where")
        result = export_flow(
            config=cfg.model_dump(mode="json", by_alias=True),
            workspace=workspace,
            formats=formats,
            where=where,
            push_to_hub=push_to_hub,
            dedupe=dedupe,
        )
        console.print(f"exported {result['n_items']:,} items")
        console.print(duplicates_line(result["duplicates"]), highlight=False)
        if result["duplicate_warning"]:
            console.print(f"[bold yellow]warning:[/] {result['duplicate_warning']}", highlight=False)
        for fmt, info in result["exports"].items():
            console.print(f"  {fmt}: {info['path']}  ({info['export_id']})")
        if result["report"]:
            console.print(f"report: {result['report']}")
        if result["hub_url"]:
            console.print(f"pushed: {result['hub_url']}")


def duplicates_line(found: dict) -> str:
    """What the export found and dropped, in one line (the counts of tasks/export_dedupe.Duplicates)."""
    dropped = f"dropped {found['dropped']:,}" if found["dropped"] else "kept all"
    return (
        f"duplicates: {found['exact']:,} exact, {found['response']:,} repeating an earlier item's response "
        f"(of {found['selected']:,} selected; export.dedupe: {found['dedupe']}, {dropped})"
    )
