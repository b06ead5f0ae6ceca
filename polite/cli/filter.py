"""CLI commands of the filter stage: `polite filter [--rethreshold] [--full-scoring] [--set KEY=VALUE]`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from polite.cli.common import ConfigOpt, WorkspaceOpt, console, stage_config, user_errors


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``semantic.threshold=0.5`` sets ``config["filters"]["semantic"]["threshold"]`` (values parsed as YAML)."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"--set takes KEY=VALUE under `filters.`, e.g. semantic.threshold=0.5; got {item!r}"
            )
        parts = key.strip().removeprefix("filters.").split(".")
        node = config.setdefault("filters", {})
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: filters.{part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return config


def register(app: typer.Typer) -> None:
    """Add this stage's commands to `app`."""

    @app.command("filter")
    @user_errors
    def filter_cmd(
        workspace: WorkspaceOpt = None,
        config: ConfigOpt = None,
        rethreshold: Annotated[
            bool,
            typer.Option(
                "--rethreshold", help="Re-decide from stored scores with new thresholds; loads no model."
            ),
        ] = False,
        full_scoring: Annotated[
            bool,
            typer.Option(
                "--full-scoring", help="Score every scorer even after an earlier one dropped a rewrite."
            ),
        ] = False,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="Override a filters setting, KEY=VALUE (repeatable), e.g. semantic.threshold=0.5.",
            ),
        ] = None,
    ) -> None:
        """Score the latest rewrites (length, unchanged, repetition, truncated, answer, semantic, nli, clipscore, reward)
        and decide which to keep. Resumable: decided rewrites and stored scores are never redone.

        Example: polite filter --rethreshold --set semantic.threshold=0.5 --set clipscore.threshold=20
        """
        from flows.filter import filter_flow
        from polite.config import parse_config

        data = stage_config(config).model_dump(mode="json")
        data = apply_overrides(data, set_ or [])
        parse_config(data, origin=config or "(demo config + --set)")
        summary = filter_flow(
            config=data, workspace=workspace, rethreshold=rethreshold, full_scoring=full_scoring
        )
        if "rethreshold" in summary:
            r = summary["rethreshold"]
            console.print(f"re-decided {r['decided']} rewrites in {r['seconds']:.3f}s: {r['kept']} kept")
        else:
            console.print(
                f"filtered {summary.get('rewrites', 0)} rewrites: {summary.get('kept', 0)} of "
                f"{summary.get('decided', 0)} decided rewrites kept"
            )
